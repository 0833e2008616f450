//! The Debian package for the Pi: what it installs, its conffile, its maintainer scripts.

use std::process::Command;

use tidepool_e2e::*;

fn dpkg_deb(args: &[&str]) -> String {
    let out = Command::new("dpkg-deb")
        .args(args)
        .output()
        .expect("dpkg-deb");
    assert!(
        out.status.success(),
        "dpkg-deb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn arm64_deb_has_binaries_unit_conffile_rules_and_user_creation() {
    let out = Command::new(root().join("scripts/package-deb"))
        .arg("aarch64-unknown-linux-gnu")
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = root().join(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim(),
    );
    let deb = deb.to_str().unwrap();
    let listing = dpkg_deb(&["-c", deb]);
    for path in [
        "./usr/bin/tidepool",
        "./usr/bin/tidepool-sim",
        "./lib/systemd/system/tidepool.service",
        "./etc/tidepool/tidepool.toml",
        "./etc/tidepool/rules/",
        "./usr/share/doc/tidepool/examples/rules/10-threshold-alert.rhai",
        "./usr/share/doc/tidepool/batch.schema.json",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} missing from:\n{listing}"
        );
    }
    assert_eq!(dpkg_deb(&["-f", deb, "Architecture"]).trim(), "arm64");
    assert!(dpkg_deb(&["-f", deb, "Depends"]).contains("libc6 (>= 2.35)"));
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("control");
    dpkg_deb(&["-e", deb, ctl.to_str().unwrap()]);
    let conffiles = std::fs::read_to_string(ctl.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/tidepool/tidepool.toml");
    let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
    assert!(postinst.contains("adduser --system --group") && postinst.contains("dialout"));
    // The installed config is valid as shipped.
    let out = command("tidepool")
        .args(["check", "--config"])
        .arg(root().join("packaging/tidepool.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
