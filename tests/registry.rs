//! Fetching a named model: pip download + unpack from the wheel, with a fake pip and a fake entry
//! (no network), and the errors for a missing pip and a corrupt wheel.

use ferrolens::model::registry::{pull, unpack_wheel, unpack_wheels, RegistryEntry, WheelPart};
use std::io::Write;

const FAKE: RegistryEntry = RegistryEntry {
    name: "fake-model",
    parts: &[WheelPart { requirement: "fake-model==1.0", member: "fake_model/weights.gguf" }],
    file: "weights.gguf",
    size: 11,
    // sha256("hello world")
    sha256: "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9",
    about: "test",
};

/// A model in two wheels whose members are concatenated ("hello " + "world").
const SPLIT: RegistryEntry = RegistryEntry {
    name: "split-model",
    parts: &[
        WheelPart { requirement: "split-model-part1==1.0", member: "split_model_part1/data/w.part00" },
        WheelPart { requirement: "split-model-part2==1.0", member: "split_model_part2/data/w.part01" },
    ],
    file: "w.gguf",
    size: 11,
    sha256: "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9",
    about: "test",
};

fn wheel_with(path: &std::path::Path, member: &str, content: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    z.start_file(member, zip::write::SimpleFileOptions::default()).unwrap();
    z.write_all(content).unwrap();
    z.finish().unwrap();
}

fn wheel(path: &std::path::Path, content: &[u8]) {
    wheel_with(path, "fake_model/weights.gguf", content)
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
    std::fs::write(
        &script,
        format!("#!/bin/sh\nwhile [ \"$1\" != \"-d\" ]; do shift; done\nexec /bin/cp {} \"$2\"/fake_model-1.0-py3-none-any.whl\n", good.display()),
    )
    .unwrap();
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

    // The same size but other bytes: the checksum catches it.
    wheel(&bad, b"hello_world");
    let e = unpack_wheel(&FAKE, &bad).unwrap_err().to_string();
    assert!(e.contains("SHA-256") && e.contains("expected b94d27b9"), "{e}");

    // A model in parts: one pip call fetches both wheels; members are joined in order.
    let (p1, p2) = (home.join("split_model_part1-1.0-py3-none-any.whl"), home.join("split_model_part2-1.0-py3-none-any.whl"));
    wheel_with(&p1, "split_model_part1/data/w.part00", b"hello ");
    wheel_with(&p2, "split_model_part2/data/w.part01", b"world");
    let script2 = home.join("fake-pip2.sh");
    std::fs::write(&script2, format!("#!/bin/sh\nwhile [ \"$1\" != \"-d\" ]; do shift; done\n/bin/cp {} {} \"$2\"/\n", p1.display(), p2.display())).unwrap();
    std::process::Command::new("/bin/chmod").arg("+x").arg(&script2).status().unwrap();
    std::env::set_var("FERROLENS_PIP", &script2);
    let p = pull(&SPLIT).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"hello world");
    // Out of order, the checksum fails; too few wheels is an error naming the parts.
    let e = unpack_wheels(&SPLIT, &[p2.clone(), p1.clone()]).unwrap_err().to_string();
    assert!(e.contains("lacks split_model_part1"), "{e}");
    let e = unpack_wheels(&SPLIT, std::slice::from_ref(&p1)).unwrap_err().to_string();
    assert!(e.contains("2 wheel(s)") && e.contains("split-model-part2==1.0"), "{e}");

    // No pip anywhere: a message that says what to install.
    std::env::set_var("FERROLENS_PIP", home.join("no-such-pip"));
    std::env::set_var("PATH", "");
    let e = pull(&FAKE).unwrap_err().to_string();
    assert!(e.contains("Install Python's pip") && e.contains("fake-model==1.0"), "{e}");
    std::fs::remove_dir_all(&home).ok();
}
