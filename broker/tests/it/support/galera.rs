//! A private 3-node MariaDB Galera cluster for tests: three `mariadbd` processes on loopback,
//! each with its own data dir and its own ports (client, group communication, IST, SST), never
//! the system server. Node 1 bootstraps the cluster (`--wsrep-new-cluster`); nodes 2 and 3
//! join it with a full state transfer (rsync SST), one after the other.
//!
//! Faults the tests inject: [`GaleraCluster::kill`] (SIGKILL, as a crash would) and
//! [`GaleraCluster::restart`] (the node recovers its position from InnoDB and catches up with
//! an incremental state transfer, IST, from the gcache), [`GaleraCluster::freeze`] /
//! [`GaleraCluster::thaw`] (SIGSTOP/SIGCONT: to the others the node is partitioned away; once
//! thawed it finds itself outside the primary component and rejoins).
//!
//! Like [`super::mariadb`], each `mariadbd` runs under a tiny `sh` guard that SIGKILLs it when
//! the test process goes away. When the tests run as root (CI containers), the servers run as
//! the `mysql` user, which then owns the data dirs. If Galera or rsync is missing the tests
//! fail with instructions: they never skip.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Database, DatabaseConnection};

use super::mariadb::{current_user, find_program, install_data_dir, PASSWORD, USER};

/// Debian's `galera-4` package.
pub const PROVIDER: &str = "/usr/lib/galera/libgalera_smm.so";

/// Group-communication timeouts, shortened from the defaults (5 s suspect, 15 s inactive) so
/// that a frozen node is evicted within seconds, and the test stays short.
const EVS_OPTIONS: &str = "evs.suspect_timeout=PT2S; evs.inactive_timeout=PT3S; \
    evs.inactive_check_period=PT0.5S; evs.keepalive_period=PT0.5S; evs.install_timeout=PT3S";

/// One node; nodes are numbered from 1, as in their logs.
struct Node {
    port: u16,
    gcomm_port: u16,
    ist_port: u16,
    sst_port: u16,
    guard: Option<Child>,
}

pub struct GaleraCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    cluster_name: String,
    /// The user the servers run as: `mysql` when the tests run as root.
    run_as: String,
}

impl GaleraCluster {
    /// Starts a 3-node cluster and waits until every node is synced.
    pub fn start() -> GaleraCluster {
        assert!(
            Path::new(PROVIDER).is_file(),
            "{PROVIDER} not found: the Galera tests need the galera-4 package. \
             Run ./scripts/test (it installs it) or `apt-get install -y galera-4 rsync`."
        );
        find_program("rsync");
        let dir = tempfile::Builder::new()
            .prefix("co2-galera-")
            .tempdir()
            .expect("temp dir for Galera");
        let run_as = match current_user().as_str() {
            "root" => "mysql".to_owned(),
            user => user.to_owned(),
        };
        // One initialised data dir, copied to every node before any starts; nodes 2 and 3
        // then replace theirs with node 1's by SST.
        let template = dir.path().join("template");
        let tmp = dir.path().join("tmp-install");
        std::fs::create_dir_all(&tmp).expect("install temp dir");
        if run_as != current_user() {
            chown(dir.path(), &run_as);
        }
        install_data_dir(&template, &tmp, &run_as, dir.path());
        let mut nodes = Vec::new();
        for number in 1..=3 {
            let node_dir = dir.path().join(format!("node{number}"));
            std::fs::create_dir_all(node_dir.join("tmp")).expect("node dir");
            let copy = Command::new("cp")
                .arg("-a")
                .arg(&template)
                .arg(node_dir.join("data"))
                .status()
                .expect("cp runs");
            assert!(copy.success(), "copying the data dir template");
            nodes.push(Node {
                port: super::free_port(),
                gcomm_port: super::free_port(),
                ist_port: super::free_port(),
                sst_port: super::free_port(),
                guard: None,
            });
        }
        if run_as != current_user() {
            chown(dir.path(), &run_as);
        }
        let mut cluster = GaleraCluster {
            dir,
            nodes,
            cluster_name: format!("co2-test-{}", std::process::id()),
            run_as,
        };
        let init_file = format!(
            "--init-file={}",
            cluster.dir.path().join("init.sql").display()
        );
        cluster.launch(1, &[init_file, "--wsrep-new-cluster".to_owned()]);
        cluster.wait_synced(1, Duration::from_secs(60));
        for number in 2..=3 {
            cluster.launch(number, &[]);
            cluster.wait_synced(number, Duration::from_secs(120));
        }
        cluster
    }

    fn node(&self, number: usize) -> &Node {
        &self.nodes[number - 1]
    }

    fn node_dir(&self, number: usize) -> PathBuf {
        self.dir.path().join(format!("node{number}"))
    }

    /// The node's error log (where Galera logs state transfers).
    pub fn error_log(&self, number: usize) -> String {
        std::fs::read_to_string(self.node_dir(number).join("error.log")).unwrap_or_default()
    }

    /// `mariadbd`'s arguments for node `number`, logging to `log_file` in its dir.
    fn server_args(&self, number: usize, log_file: &str) -> Vec<String> {
        let d = self.node_dir(number);
        let node = self.node(number);
        let peers = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.gcomm_port))
            .collect::<Vec<_>>()
            .join(",");
        let provider_options = format!(
            "gmcast.listen_addr=tcp://127.0.0.1:{gcomm}; ist.recv_addr=127.0.0.1:{ist}; \
             gcache.size=64M; {EVS_OPTIONS}",
            gcomm = node.gcomm_port,
            ist = node.ist_port,
        );
        vec![
            "--no-defaults".to_owned(),
            format!("--datadir={}", d.join("data").display()),
            format!("--tmpdir={}", d.join("tmp").display()),
            format!("--port={}", node.port),
            "--bind-address=127.0.0.1".to_owned(),
            format!("--socket={}", d.join("mysqld.sock").display()),
            format!("--pid-file={}", d.join("mysqld.pid").display()),
            format!("--log-error={}", d.join(log_file).display()),
            format!("--user={}", self.run_as),
            "--innodb-buffer-pool-size=128M".to_owned(),
            "--max-connections=300".to_owned(),
            "--binlog-format=ROW".to_owned(),
            "--default-storage-engine=InnoDB".to_owned(),
            "--innodb-autoinc-lock-mode=2".to_owned(),
            "--wsrep-on=ON".to_owned(),
            format!("--wsrep-provider={PROVIDER}"),
            format!("--wsrep-provider-options={provider_options}"),
            format!("--wsrep-cluster-name={}", self.cluster_name),
            format!("--wsrep-cluster-address=gcomm://{peers}"),
            format!("--wsrep-node-name=node{number}"),
            format!("--wsrep-node-address=127.0.0.1:{}", node.gcomm_port),
            "--wsrep-sst-method=rsync".to_owned(),
            format!("--wsrep-sst-receive-address=127.0.0.1:{}", node.sst_port),
            "--wsrep-slave-threads=2".to_owned(),
            // Reads wait until the node has applied what the cluster committed before them,
            // so a test reading from any node sees every committed row.
            "--wsrep-sync-wait=1".to_owned(),
        ]
    }

    fn launch(&mut self, number: usize, extra: &[String]) {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#""$@" & server=$!; read _; kill -9 $server"#)
            .arg("galera-guard")
            .arg(find_program("mariadbd"))
            .args(self.server_args(number, "error.log"))
            .args(extra);
        let guard = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd starts");
        self.nodes[number - 1].guard = Some(guard);
    }

    /// Waits until node `number` accepts connections and reports itself `Synced`.
    pub fn wait_synced(&self, number: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.state_comment(number).as_deref() == Some("Synced") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Galera node {number} not synced after {timeout:?}; its log:\n{}",
                tail(&self.error_log(number), 40)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `wsrep_local_state_comment` of node `number`, if it answers (over the `mariadb` client,
    /// so it works from synchronous code and in any runtime).
    pub fn state_comment(&self, number: usize) -> Option<String> {
        let out = Command::new(find_program("mariadb"))
            .arg("--no-defaults")
            .arg("--protocol=tcp")
            .arg("--host=127.0.0.1")
            .arg(format!("--port={}", self.node(number).port))
            .arg(format!("--user={USER}"))
            .arg(format!("--password={PASSWORD}"))
            .arg("--connect-timeout=2")
            .arg("--batch")
            .arg("--skip-column-names")
            .arg("--execute=SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'WSREP_LOCAL_STATE_COMMENT'")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    /// `mysql://co2:…@127.0.0.1:<port of node>/<database>`
    pub fn url(&self, number: usize, database: &str) -> String {
        format!(
            "mysql://{USER}:{PASSWORD}@127.0.0.1:{}/{database}",
            self.node(number).port
        )
    }

    /// Creates an empty database (on node 1; Galera replicates the DDL) and returns its name.
    pub async fn create_database(&self, name: &str) -> String {
        let admin = self.connect(1, "").await;
        admin
            .execute_unprepared(&format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
            .await
            .expect("CREATE DATABASE");
        name.to_owned()
    }

    /// Connects to node `number`, retrying while it is still starting up.
    pub async fn connect(&self, number: usize, database: &str) -> DatabaseConnection {
        let mut last_error = None;
        for _ in 0..100 {
            match Database::connect(self.url(number, database)).await {
                Ok(db) => return db,
                Err(e) => last_error = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot connect to Galera node {number}: {last_error:?}");
    }

    /// Runs one statement on node `number` (e.g. `SET GLOBAL …`).
    pub async fn execute(&self, number: usize, sql: &str) {
        let conn = self.connect(number, "").await;
        conn.execute_unprepared(sql)
            .await
            .unwrap_or_else(|e| panic!("node {number}: {sql}: {e}"));
    }

    fn pid(&self, number: usize) -> String {
        let path = self.node_dir(number).join("mysqld.pid");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_owned()
    }

    fn signal(&self, number: usize, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid(number))
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} Galera node {number}");
    }

    /// SIGKILLs node `number`, as a crash or an OOM kill would.
    pub fn kill(&mut self, number: usize) {
        self.signal(number, "KILL");
        self.release_guard(number);
        let port = self.node(number).port;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a killed node again on its data dir and waits until it is synced. Like
    /// `galera_recovery` (what the systemd unit runs), it first recovers the node's last
    /// committed position from InnoDB (`--wsrep-recover`) and passes it on: without it the
    /// node would not know where it stopped and would need a full SST instead of an IST.
    pub fn restart(&mut self, number: usize, timeout: Duration) {
        assert!(self.node(number).guard.is_none(), "restart after kill");
        let recover = Command::new(find_program("mariadbd"))
            .args(self.server_args(number, "recover.log"))
            .arg("--wsrep-recover")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("mariadbd --wsrep-recover runs");
        let log =
            std::fs::read_to_string(self.node_dir(number).join("recover.log")).unwrap_or_default();
        let position = log
            .lines()
            .rev()
            .find_map(|l| {
                l.split_once("WSREP: Recovered position: ")
                    .map(|(_, p)| p.trim())
            })
            .unwrap_or_else(|| {
                panic!(
                    "node {number}: no recovered position ({recover}):\n{}",
                    tail(&log, 30)
                )
            })
            .to_owned();
        let deadline = Instant::now() + timeout;
        loop {
            let log_before = self.error_log(number).len();
            self.launch(number, &[format!("--wsrep-start-position={position}")]);
            // The killed node's group-communication port can still be held by its sockets in
            // TIME_WAIT, and Galera binds without SO_REUSEADDR: then it aborts and is started
            // again a moment later.
            loop {
                if self.state_comment(number).as_deref() == Some("Synced") {
                    return;
                }
                let since = self
                    .error_log(number)
                    .get(log_before..)
                    .unwrap_or("")
                    .to_owned();
                assert!(
                    Instant::now() < deadline,
                    "Galera node {number} not synced after {timeout:?}; its log:\n{}",
                    tail(&since, 40)
                );
                if since.contains("Address already in use") && since.contains("Aborting") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            self.release_guard(number);
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// SIGSTOP: the node stops answering anyone, its peers and its clients, like a machine
    /// cut off the network (its TCP connections stay open).
    pub fn freeze(&self, number: usize) {
        self.signal(number, "STOP");
    }

    /// SIGCONT after [`Self::freeze`].
    pub fn thaw(&self, number: usize) {
        self.signal(number, "CONT");
    }

    /// Closing the guard's stdin makes it SIGKILL its server (if still alive) and exit.
    fn release_guard(&mut self, number: usize) {
        if let Some(mut guard) = self.nodes[number - 1].guard.take() {
            if let Some(mut stdin) = guard.stdin.take() {
                let _ = stdin.write_all(b"\n"); // the pipe may already be closed; the guard then exits anyway
            }
            let _ = guard.wait(); // reaping only
        }
    }
}

impl Drop for GaleraCluster {
    fn drop(&mut self) {
        // SIGKILL ends a frozen (SIGSTOPped) node too.
        for number in 1..=self.nodes.len() {
            self.release_guard(number);
        }
    }
}

fn chown(path: &Path, user: &str) {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:{user}"))
        .arg(path)
        .status()
        .expect("chown runs");
    assert!(status.success(), "chown -R {user} {}", path.display());
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
