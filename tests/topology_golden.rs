//! Golden files for `baton topology describe`: the text and the Mermaid
//! diagram of the shipped workflow. Run with `UPDATE_GOLDEN=1` to rewrite
//! them after an intended change, and review the diff.

use std::path::{Path, PathBuf};

use baton::topology::{Topology, describe};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn assert_golden(name: &str, actual: &str) {
    let path = repo_path("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|error| {
        panic!(
            "{}: {error}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    assert!(
        actual == expected,
        "{} differs from the output; run with UPDATE_GOLDEN=1 if the change is intended\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

fn shipped() -> Topology {
    Topology::load(&repo_path("topology/vision-research.toml"))
        .expect("the shipped topology is valid")
}

#[test]
fn mermaid_of_vision_research() {
    assert_golden("vision-research.mmd", &describe::mermaid(&shipped()));
}

#[test]
fn text_of_vision_research() {
    assert_golden("vision-research.txt", &describe::text(&shipped()));
}

fn with_approval() -> Topology {
    Topology::load(&repo_path("topology/research-with-approval.toml"))
        .expect("the shipped approval workflow is valid")
}

#[test]
fn mermaid_of_research_with_approval() {
    assert_golden(
        "research-with-approval.mmd",
        &describe::mermaid(&with_approval()),
    );
}

#[test]
fn text_of_research_with_approval() {
    assert_golden(
        "research-with-approval.txt",
        &describe::text(&with_approval()),
    );
}

#[test]
fn the_topology_directory_describes_both_workflows() {
    let directory = Topology::load(&repo_path("topology")).expect("topology/ is valid");
    let text = describe::text(&directory);
    assert_eq!(
        text,
        format!(
            "{}\n{}",
            describe::text(&with_approval()),
            describe::text(&shipped())
        )
    );
    let mermaid = describe::mermaid(&directory);
    for one in [
        describe::mermaid(&with_approval()),
        describe::mermaid(&shipped()),
    ] {
        let body = one.trim_start_matches("stateDiagram-v2\n");
        assert!(
            mermaid.contains(body),
            "the directory's diagram holds each workflow's"
        );
    }
}
