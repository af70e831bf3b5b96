//! The real `template.yaml`, and one-break mutations of it for the tests that show a check
//! reports what it should.

/// The text of the workspace's `template.yaml`.
pub fn real_template_text() -> String {
    std::fs::read_to_string(crate::repo_root().join("template.yaml")).expect("read template.yaml")
}

/// The real template with the first `find` (after `after`, when given) replaced by `replace`;
/// panics if the template no longer contains them, so a mutation can never silently not apply.
pub fn mutated(find: &str, replace: &str, after: Option<&str>) -> String {
    let text = real_template_text();
    let start = after
        .map(|a| {
            text.find(a)
                .unwrap_or_else(|| panic!("template no longer contains {a:?}"))
        })
        .unwrap_or(0);
    let at = text[start..]
        .find(find)
        .unwrap_or_else(|| panic!("template no longer contains {find:?} (after {after:?})"))
        + start;
    format!("{}{}{}", &text[..at], replace, &text[at + find.len()..])
}

/// Problems as an indented list, for assertion messages.
pub fn report(problems: &[String]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}
