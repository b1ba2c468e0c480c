//! The release binary of `scripts/build.sh`: statically linked, and still able to resolve
//! names. It runs here in an empty root (no shared library, no nsswitch.conf) in a network
//! namespace of its own, with a DNS server and an HTTP server of the test's, and reaches the
//! HTTP server by `localhost`, by a name in /etc/hosts and by a name only DNS knows.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Set by `scripts/test.sh` after it ran `scripts/build.sh`.
const STATIC_BIN: &str = "SDP_TEST_STATIC_BIN";

/// The static binary, or `None` (the test skips) outside CI when it was not built.
pub(crate) fn static_binary() -> Option<PathBuf> {
    let built = std::env::var_os(STATIC_BIN).map(PathBuf::from).or_else(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        ["ci-static", "release"]
            .iter()
            .map(|p| {
                root.join("target/x86_64-unknown-linux-gnu")
                    .join(p)
                    .join("sdp")
            })
            .find(|p| p.exists())
    });
    match built {
        Some(path) if path.exists() => Some(path),
        _ => {
            let how = format!(
                "no static sdp: run scripts/build.sh (scripts/test.sh does, and sets {STATIC_BIN})"
            );
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{how}");
            eprintln!("skipping: {how}");
            None
        }
    }
}

/// Answers every A question with 127.0.0.1 and every other question with no record: just
/// enough DNS for glibc's resolver.
const DNS_SERVER: &str = r#"import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("dns ready", flush=True)
while True:
    q, peer = s.recvfrom(512)
    end = 12
    while q[end] != 0:
        end += q[end] + 1
    question = q[12:end + 5]
    qtype = struct.unpack(">H", q[end + 1:end + 3])[0]
    head = struct.pack(">HH", struct.unpack(">H", q[:2])[0], 0x8180)
    if qtype == 1:
        answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton("127.0.0.1")
        s.sendto(head + struct.pack(">HHHH", 1, 1, 0, 0) + question + answer, peer)
    else:
        s.sendto(head + struct.pack(">HHHH", 1, 0, 0, 0) + question, peer)
"#;

#[test]
fn the_static_binary_resolves_localhost_hosts_entries_and_dns_names_with_no_library_around() {
    let Some(bin) = static_binary() else {
        return;
    };
    let kind = Command::new("file").arg("-b").arg(&bin).output().unwrap();
    let kind = String::from_utf8_lossy(&kind.stdout).into_owned();
    assert!(
        kind.contains("statically linked") || kind.contains("static-pie linked"),
        "{}: {kind}",
        bin.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::copy(&bin, root.join("sdp")).unwrap();
    std::fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost\n127.0.0.1 sdp-from-hosts.test\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
    std::fs::write(dir.path().join("dns.py"), DNS_SERVER).unwrap();

    // In a network namespace of its own: port 53 and 8080 are the test's, and nothing
    // outside is reached. The HTTP server answers 404 to everything, which the client reports
    // with the path it asked: the proof that the name led to it.
    let script = r#"
set -e
ip link set lo up
python3 dns.py > dns.log 2>&1 &
dns=$!
python3 -m http.server --bind 127.0.0.1 8080 --directory "$PWD/root/etc" > http.log 2>&1 &
http=$!
trap 'kill $dns $http' EXIT
for _ in $(seq 100); do
  grep -q "dns ready" dns.log && python3 -c 'import socket; socket.create_connection(("127.0.0.1", 8080))' 2>/dev/null && break
  sleep 0.1
done
for name in localhost sdp-from-hosts.test sdp.only-in-dns.test; do
  echo "== $name"
  env -i SDP_SERVER="http://$name:8080" SDP_TOKEN=sdp_x XDG_CONFIG_HOME=/nowhere "$(command -v chroot)" root /sdp ls 2>&1 || true
done
"#;
    let out = Command::new("unshare")
        .args(["--net", "bash", "-c", script])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for name in ["localhost", "sdp-from-hosts.test", "sdp.only-in-dns.test"] {
        let answer = text
            .split(&format!("== {name}\n"))
            .nth(1)
            .and_then(|rest| rest.split("== ").next())
            .unwrap_or_else(|| panic!("no answer for {name}:\n{text}"));
        assert!(
            answer.contains("404") && answer.contains("/api/session"),
            "{name} did not lead to the test's server:\n{text}"
        );
    }
}
