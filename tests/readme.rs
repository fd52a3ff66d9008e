//! The README shows code a user copies: every line of its "Add it to a service" snippets must be in
//! `examples/readme/main.rs`, which the workspace compiles.

#[test]
fn the_readmes_integration_snippets_are_compiled_code() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let example = std::fs::read_to_string(format!("{root}/examples/readme/main.rs")).unwrap();
    let compiled: Vec<&str> = example.lines().map(str::trim).collect();
    let section = readme
        .split("## Add it to a service")
        .nth(1)
        .expect("README has the section")
        .split("\n## ")
        .next()
        .unwrap();
    let mut checked = 0;
    for block in section.split("```rust").skip(1) {
        let code = block.split("```").next().unwrap();
        for line in code.lines().skip(1).map(str::trim).filter(|l| !l.is_empty()) {
            // The last statement of a block is returned by the function that holds it.
            let found = compiled
                .iter()
                .any(|c| *c == line || c.contains(line.trim_end_matches(';')));
            assert!(found, "README line not in examples/readme/main.rs:\n{line}");
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} lines found in the README's snippets");
}
