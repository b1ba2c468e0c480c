//! The control plane's SQLite file, read the way an operator would: by Python's sqlite3, next
//! to the running server (WAL mode allows it), read-only.

use std::path::PathBuf;
use std::process::Command;

/// The database under a server's data directory.
pub struct Database {
    pub path: PathBuf,
}

impl Database {
    pub fn in_data_dir(data_dir: &std::path::Path) -> Database {
        Database {
            path: data_dir.join("sdp.db"),
        }
    }

    /// The journal mode.
    pub fn journal_mode(&self) -> String {
        self.query("PRAGMA journal_mode")
    }

    /// Rows in `table`.
    pub fn count_rows(&self, table: &str) -> u64 {
        self.query(&format!("SELECT COUNT(*) FROM {table}"))
            .parse()
            .unwrap()
    }

    /// The audit trail's actions, oldest first, joined by commas.
    pub fn audit_actions(&self) -> String {
        self.query("SELECT group_concat(action, ',') FROM (SELECT action FROM audit ORDER BY id)")
    }

    /// The first column of the first row `query` gives.
    pub fn query(&self, query: &str) -> String {
        let out = Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys; c=sqlite3.connect('file:'+sys.argv[1]+'?mode=ro', uri=True); print(c.execute(sys.argv[2]).fetchone()[0])",
            ])
            .arg(&self.path)
            .arg(query)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}
