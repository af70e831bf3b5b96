#!/usr/bin/env python3
"""The saga's SQS load against SQS stand-ins, side by side: which one keeps up with a backlog.

For each stand-in, on a fresh server: a queue with a DLQ (maxReceiveCount 5, as the template's
work queues), filled with --messages messages (SendMessageBatch from 4 threads), then drained
by --consumers threads doing what the runner's event source mapping does (ReceiveMessage of
10 with a 1 s long poll and all attributes, DeleteMessageBatch). A monitor thread calls
ListQueues and GetQueueAttributes once a second meanwhile, as the tests' pacing does. It
reports fill and drain rates, call latencies and how many messages reached the DLQ (none
may: nothing here fails a message).

Stand-ins: `moto` (moto_server as installed), `moto-linear` (infra/moto/serve.py, the same
moto with its quadratic receive paths fixed; what the project runs), and any `--endpoint URL`
of a server started by hand.

    .venv/bin/python infra/scripts/sqs-emulator-bench.py [--messages 5000] [--consumers 15]
        [--only moto-linear] [--endpoint NAME=URL] [--deadline 600]

Only 127.0.0.1 is ever contacted. Exit status 1 if a stand-in did not drain within the
deadline or dead-lettered a message.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import boto3
from botocore.config import Config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
VENV_BIN = os.path.join(REPO, ".venv", "bin")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client(endpoint):
    return boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=Config(retries={"max_attempts": 1}, read_timeout=120, max_pool_connections=64),
    )


def wait_up(endpoint, deadline=60):
    end = time.time() + deadline
    while time.time() < end:
        try:
            client(endpoint).list_queues()
            return
        except Exception:
            time.sleep(0.2)
    raise SystemExit(f"{endpoint} did not answer within {deadline} s")


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def run_load(endpoint, messages, consumers, deadline):
    sqs = client(endpoint)
    suffix = str(int(time.time() * 1000))
    dlq = sqs.create_queue(QueueName=f"bench-dlq-{suffix}")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue = sqs.create_queue(
        QueueName=f"bench-{suffix}",
        Attributes={
            "VisibilityTimeout": "30",
            "RedrivePolicy": f'{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"5"}}',
        },
    )["QueueUrl"]
    body = '{"type":"ReserveStock","orderId":"%s","items":[{"productId":"p-1","quantity":2}]}'

    # Fill.
    started = time.time()
    batches = [list(range(i, min(i + 10, messages))) for i in range(0, messages, 10)]
    lock = threading.Lock()

    def fill(part):
        c = client(endpoint)
        for batch in part:
            c.send_message_batch(
                QueueUrl=queue,
                Entries=[{"Id": str(i), "MessageBody": body % i} for i in batch],
            )

    threads = [threading.Thread(target=fill, args=(batches[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fill_s = time.time() - started

    # Drain, with a monitor.
    received = [0]
    receive_ms, delete_ms, monitor_ms = [], [], []
    done = threading.Event()
    started = time.time()

    def consume():
        c = client(endpoint)
        while not done.is_set() and time.time() - started < deadline:
            t0 = time.time()
            out = c.receive_message(
                QueueUrl=queue,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=1,
                VisibilityTimeout=30,
                MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"],
            )
            got = out.get("Messages", [])
            with lock:
                receive_ms.append((time.time() - t0) * 1000)
            if not got:
                continue
            t0 = time.time()
            c.delete_message_batch(
                QueueUrl=queue,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)],
            )
            with lock:
                delete_ms.append((time.time() - t0) * 1000)
                received[0] += len(got)
                if received[0] >= messages:
                    done.set()

    def monitor():
        c = client(endpoint)
        while not done.is_set() and time.time() - started < deadline:
            t0 = time.time()
            c.list_queues()
            c.get_queue_attributes(
                QueueUrl=queue,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )
            monitor_ms.append((time.time() - t0) * 1000)
            done.wait(1)
        

    threads = [threading.Thread(target=consume) for _ in range(consumers)]
    threads.append(threading.Thread(target=monitor))
    last_report = time.time()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        if time.time() - last_report >= 10:
            last_report = time.time()
            print(f"  ... {received[0]} of {messages} drained after {time.time() - started:.0f} s", file=sys.stderr)
    drain_s = time.time() - started
    dead = int(
        sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"][
            "ApproximateNumberOfMessages"
        ]
    )
    for url in (queue, dlq):
        sqs.delete_queue(QueueUrl=url)
    return {
        "fill_s": fill_s,
        "drained": received[0],
        "drain_s": drain_s,
        "rate": received[0] / drain_s if drain_s else 0,
        "receive_p50": pct(receive_ms, 50),
        "receive_p99": pct(receive_ms, 99),
        "delete_p50": pct(delete_ms, 50),
        "delete_p99": pct(delete_ms, 99),
        "monitor_max": max(monitor_ms) if monitor_ms else float("nan"),
        "dead": dead,
    }


def start(name, port):
    if name == "moto":
        cmd = [os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    else:
        cmd = [os.path.join(VENV_BIN, "python"), os.path.join(REPO, "infra", "moto", "serve.py"), "-H", "127.0.0.1", "-p", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--consumers", type=int, default=15)
    ap.add_argument("--deadline", type=float, default=600, help="seconds a drain may take")
    ap.add_argument("--only", action="append", choices=["moto", "moto-linear"], help="local stand-ins to run")
    ap.add_argument("--endpoint", action="append", default=[], metavar="NAME=URL", help="an emulator started by hand")
    args = ap.parse_args()

    results = []
    for name in args.only or ["moto", "moto-linear"]:
        port = free_port()
        proc = start(name, port)
        try:
            endpoint = f"http://127.0.0.1:{port}"
            wait_up(endpoint)
            print(f"{name}: {args.messages} messages, {args.consumers} consumers", file=sys.stderr)
            results.append((name, run_load(endpoint, args.messages, args.consumers, args.deadline)))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    for spec in args.endpoint:
        name, _, url = spec.partition("=")
        if not url.startswith("http://127.0.0.1:") and not url.startswith("http://localhost:"):
            raise SystemExit(f"only 127.0.0.1 endpoints: {url}")
        wait_up(url)
        print(f"{name}: {args.messages} messages, {args.consumers} consumers", file=sys.stderr)
        results.append((name, run_load(url, args.messages, args.consumers, args.deadline)))

    print(f"\n{args.messages} messages, {args.consumers} consumers (receive 10, delete batch), on {os.cpu_count()} cores\n")
    print("| stand-in | fill s | drained | drain s | msgs/s | receive p50/p99 ms | delete p50/p99 ms | monitor max ms | dead-lettered |")
    print("|---|---|---|---|---|---|---|---|---|")
    failed = False
    for name, r in results:
        print(
            f"| {name} | {r['fill_s']:.1f} | {r['drained']} | {r['drain_s']:.1f} | {r['rate']:.0f} | "
            f"{r['receive_p50']:.0f} / {r['receive_p99']:.0f} | {r['delete_p50']:.0f} / {r['delete_p99']:.0f} | "
            f"{r['monitor_max']:.0f} | {r['dead']} |"
        )
        failed |= r["drained"] < args.messages or r["dead"] > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
