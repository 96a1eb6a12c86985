//! A private MariaDB server for tests: its own data dir, its own port, never the system one.
//!
//! `mariadbd` runs under a tiny `sh` guard that kills it when the test process goes away (its
//! stdin pipe closes), so no server outlives the tests, even after a panic. If `mariadbd` is
//! missing the tests fail with instructions: they never skip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection};

pub const USER: &str = "co2";
pub const PASSWORD: &str = "co2-test";

pub struct MariaDb {
    dir: tempfile::TempDir,
    port: u16,
    guard: Option<Child>,
    /// `mariadbd` options given after the harness's own, so they override them (the server
    /// takes the last value of an option).
    extra_options: Vec<String>,
}

static SHARED: OnceLock<MariaDb> = OnceLock::new();
static NEXT_DATABASE: AtomicU32 = AtomicU32::new(0);

/// A MariaDB (or Galera) program on PATH or in the usual system directories.
pub(super) fn find_program(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "{name} not found: the MySQL tests need mariadb-server, the Galera tests also \
                 galera-4 and rsync. Run ./scripts/test (it installs them) or \
                 `apt-get install -y mariadb-server galera-4 rsync`."
        )
    })
}

pub(super) fn current_user() -> String {
    let out = Command::new("id")
        .arg("-un")
        .output()
        .expect("`id -un` runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl MariaDb {
    /// The server shared by every test of this process (each test gets its own database).
    pub fn shared() -> &'static MariaDb {
        SHARED.get_or_init(MariaDb::start)
    }

    /// A server of one's own, for tests that kill it.
    pub fn start() -> MariaDb {
        MariaDb::start_with(&[])
    }

    /// A server of one's own with extra `mariadbd` options, e.g. a buffer pool larger than the
    /// tests' 256 MB for the dashboard benchmark.
    pub fn start_with(extra_options: &[&str]) -> MariaDb {
        let dir = tempfile::Builder::new()
            .prefix("co2-mariadb-")
            .tempdir()
            .expect("temp dir for MariaDB");
        // A temp dir of its own: bootstraps running side by side in the shared /tmp have been
        // seen to fail on each other's temporary tables ("Could not remove temporary table").
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).expect("MariaDB temp dir");
        install_data_dir(&dir.path().join("data"), &tmp, &current_user(), dir.path());
        let mut server = MariaDb {
            dir,
            port: super::free_port(),
            guard: None,
            extra_options: extra_options.iter().map(|o| (*o).to_owned()).collect(),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let d = self.dir.path();
        let guard = Command::new("sh")
            .arg("-c")
            .arg(r#""$@" & server=$!; read _; kill -9 $server"#)
            .arg("mariadb-guard")
            .arg(find_program("mariadbd"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", d.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", d.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", d.join("error.log").display()))
            .arg(format!("--init-file={}", d.join("init.sql").display()))
            .arg(format!("--user={}", current_user()))
            .arg("--skip-log-bin")
            .arg("--innodb-buffer-pool-size=256M")
            .arg("--max-connections=500")
            .args(&self.extra_options)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd starts");
        self.guard = Some(guard);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "MariaDB did not start; see {}",
                d.join("error.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `mysql://co2:…@127.0.0.1:<port>/<database>`
    pub fn url(&self, database: &str) -> String {
        format!(
            "mysql://{USER}:{PASSWORD}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// Creates a fresh, empty database and returns its URL.
    pub async fn create_database(&self, prefix: &str) -> String {
        let name = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            NEXT_DATABASE.fetch_add(1, Ordering::Relaxed)
        );
        let admin = self.connect("").await;
        admin
            .execute_unprepared(&format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
            .await
            .expect("CREATE DATABASE");
        self.url(&name)
    }

    /// Connects, retrying while the server is still starting up.
    pub async fn connect(&self, database: &str) -> DatabaseConnection {
        let mut last_error = None;
        for _ in 0..100 {
            match Database::connect(self.url(database)).await {
                Ok(db) => return db,
                Err(e) => last_error = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot connect to the test MariaDB: {last_error:?}");
    }

    /// SIGKILLs the server, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let pid = std::fs::read_to_string(self.dir.path().join("mysqld.pid")).expect("pid file");
        let status = Command::new("kill")
            .arg("-9")
            .arg(pid.trim())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -9 mariadbd");
        self.release_guard();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server cleanly (SIGTERM, as `systemctl stop` does): InnoDB flushes and closes
    /// its files, and the server removes its pid file last, which this waits for.
    pub fn stop(&mut self) {
        let pid_file = self.dir.path().join("mysqld.pid");
        let pid = std::fs::read_to_string(&pid_file).expect("pid file");
        let status = Command::new("kill")
            .arg(pid.trim())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill mariadbd");
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while pid_file.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "MariaDB did not stop within 5 minutes; see {}",
                self.dir.path().join("error.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.release_guard();
    }

    /// Starts the server again on the same data dir and port (crash recovery included).
    pub fn restart(&mut self) {
        assert!(self.guard.is_none(), "restart after kill or stop");
        self.launch();
    }
}

impl MariaDb {
    /// Closing the guard's stdin makes it SIGKILL its server (if still alive) and exit.
    fn release_guard(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            if let Some(mut stdin) = guard.stdin.take() {
                let _ = stdin.write_all(b"\n"); // the pipe may already be closed; the guard then exits anyway
            }
            let _ = guard.wait(); // reaping only
        }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.release_guard();
    }
}

/// A new data dir at `datadir`, owned by `user`, and `<init_dir>/init.sql`, the `--init-file`
/// that gives the tests' user its password on the server's first start.
pub fn install_data_dir(datadir: &Path, tmp: &Path, user: &str, init_dir: &Path) {
    let install = Command::new(find_program("mariadb-install-db"))
        .arg("--no-defaults")
        .arg(format!("--datadir={}", datadir.display()))
        .arg(format!("--tmpdir={}", tmp.display()))
        .arg("--auth-root-authentication-method=normal")
        .arg("--skip-test-db")
        .arg(format!("--user={user}"))
        .output()
        .expect("mariadb-install-db runs");
    assert!(
        install.status.success(),
        "mariadb-install-db failed: {}",
        String::from_utf8_lossy(&install.stderr)
    );
    std::fs::write(
        init_dir.join("init.sql"),
        format!(
            "CREATE USER IF NOT EXISTS '{USER}'@'127.0.0.1' IDENTIFIED BY '{PASSWORD}';\n\
             GRANT ALL ON *.* TO '{USER}'@'127.0.0.1' WITH GRANT OPTION;\n"
        ),
    )
    .expect("init.sql");
}
