"""moto's server, with three of its SQS hot paths made linear instead of quadratic.

The local stack runs moto (pinned in infra/requirements.txt) as its SQS and Cognito stand-in.
Its SQS model keeps each queue's messages in one Python list. Three places made the cost of
receiving a message grow with everything else in the queue, so that a backlog of a few
thousand messages took moto to 100 % CPU, 10 s answers and a congestion collapse of the saga
(issue: "`make test` passes on any machine of this kind"):

1. ``receive_message`` checks every message it hands out against the queue's retention
   period by calling ``get_queue_attributes``, which computes *all* attributes, including
   three counts that walk the whole queue, three times over. Here the retention period is
   read from the queue directly.
2. ``get_queue_attributes`` computes the attributes once per requested name, three times.
   Here once per call.
3. ``Queue.messages`` and the three ``approximate_number_of_messages*`` counts read the clock
   once per message in the queue (twice for some), and every ``SendMessage`` computes all
   three counts (it reads the queue's attributes for one flag). Here the clock is read once
   per call, which makes each walk of a queue of 5,000 messages a fraction of a millisecond.

Each replacement keeps moto's semantics: same conditions, same results, same errors.
``infra/scripts/sqs-emulator-bench.py`` measures the difference side by side. The launcher
refuses to start if a patched function is missing from the installed moto, so an upgrade
that changes them fails loudly instead of silently dropping a fix; the integration tests
(visibility, redrive to the DLQ after maxReceiveCount, attributes) run against it.

Usage: python infra/moto/serve.py -H 127.0.0.1 -p 9324   (the arguments of moto_server)
"""

import sys

from moto.core.utils import unix_time, unix_time_millis
from moto.sqs import models
from moto.sqs.exceptions import InvalidAttributeName

_Queue = models.Queue
_Backend = models.SQSBackend

for owner, name in (
    (_Backend, "is_message_valid_based_on_retention_period"),
    (_Backend, "get_queue_attributes"),
    (_Queue, "messages"),
    (_Queue, "approximate_number_of_messages_delayed"),
    (_Queue, "approximate_number_of_messages_not_visible"),
):
    if not hasattr(owner, name):
        sys.exit(f"infra/moto/serve.py: moto no longer has {owner.__name__}.{name}; review the patches")


def is_message_valid_based_on_retention_period(self, queue_name, message):
    queue = self.get_queue(queue_name)
    retain_until = int(queue.message_retention_period) + message.sent_timestamp / 1000
    return retain_until > unix_time()


def get_queue_attributes(self, queue_name, attribute_names):
    queue = self.get_queue(queue_name)
    valid_names = ["All"] + queue.BASE_ATTRIBUTES + queue.FIFO_ATTRIBUTES + queue.KMS_ATTRIBUTES
    invalid_name = next((name for name in attribute_names if name not in valid_names), None)
    if invalid_name or invalid_name == "":
        raise InvalidAttributeName(invalid_name)
    computed = queue.attributes
    if "All" in attribute_names:
        return computed
    return {
        name: computed[name]
        for name in attribute_names
        if name in computed and computed[name] is not None
    }


# Message.visible is `now > visible_at`; Message.delayed is `now < delayed_until`.
def messages(self):
    now = unix_time_millis()
    return [m for m in self._messages if now > m.visible_at and not now < m.delayed_until]


def approximate_number_of_messages_delayed(self):
    now = unix_time_millis()
    return sum(1 for m in self._messages if now < m.delayed_until)


def approximate_number_of_messages_not_visible(self):
    now = unix_time_millis()
    return sum(1 for m in self._messages if not now > m.visible_at)


_Backend.is_message_valid_based_on_retention_period = is_message_valid_based_on_retention_period
_Backend.get_queue_attributes = get_queue_attributes
_Queue.messages = property(messages)
_Queue.approximate_number_of_messages_delayed = property(approximate_number_of_messages_delayed)
_Queue.approximate_number_of_messages_not_visible = property(approximate_number_of_messages_not_visible)

if __name__ == "__main__":
    from moto.server import main

    sys.exit(main())
