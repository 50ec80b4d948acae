//! S3 for the tests: [`MotoServer`] starts `moto_server` from the project
//! venv on a loopback port and drives an independent boto3 client
//! (`tests/py/s3.py`) against it to create buckets and to read, write and
//! list objects behind the server's back; [`AWS_TEST_ENV`] is the
//! environment moto, boto3 and `adce-server` share.

use std::ffi::OsString;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ctl::json_text;
use crate::files::{TestDir, write_file};
use crate::process::{
    COMMAND_TIMEOUT, LOG_TAIL_LINES, Proc, READY_POLL, free_port, run_bounded, tail_lines, text,
    venv_tool,
};

/// How long a started moto_server may take to answer HTTP.
pub const MOTO_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How many ports a moto_server start tries (a free port can be taken by
/// another test between picking and binding it).
const MOTO_START_ATTEMPTS: usize = 3;
/// How long one HTTP probe of moto_server may take.
const MOTO_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The S3 client helper run with the venv's python.
const S3_SCRIPT: &str = "py/s3.py";
/// The exit code of `s3.py get` for a missing object.
const S3_MISSING_EXIT: i32 = 4;

/// The AWS environment moto, boto3 and `adce-server` get in the tests: static
/// test credentials, region `us-east-1`, and no instance-metadata lookups.
pub const AWS_TEST_ENV: [(&str, &str); 5] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// A running `moto_server` (the S3-compatible server from the project venv)
/// on a loopback port, with an independent boto3 client (`tests/py/s3.py`)
/// to look at and change its buckets. Killed by its pid at drop.
#[derive(Debug)]
pub struct MotoServer {
    proc: Proc,
    port: u16,
    dir: TestDir,
}

impl MotoServer {
    /// Starts `$ADCE_TEST_VENV/bin/moto_server -H 127.0.0.1 -p PORT` on a
    /// free port and waits (bounded) until it answers HTTP.
    pub fn start() -> MotoServer {
        let dir = TestDir::new();
        let program = venv_tool("moto_server");
        let mut failures = Vec::new();
        for attempt in 0..MOTO_START_ATTEMPTS {
            let port = free_port();
            let args: Vec<OsString> = vec![
                "-H".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string().into(),
            ];
            let mut proc = Proc::spawn(
                &format!("moto-{attempt}"),
                &program,
                &args,
                &AWS_TEST_ENV,
                dir.path(),
                Some(dir.path()),
            );
            match wait_http(&mut proc, port) {
                Ok(()) => return MotoServer { proc, port, dir },
                Err(e) => {
                    proc.kill();
                    failures.push(format!("port {port}: {e}"));
                }
            }
        }
        panic!("moto_server did not start: {failures:#?}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment `adce-server` needs to reach this moto (for
    /// [`ServerProc::start_with_env`](crate::ServerProc::start_with_env)).
    pub fn aws_env(&self) -> &'static [(&'static str, &'static str)] {
        &AWS_TEST_ENV
    }

    /// The process.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The `lake:` section of a config for bucket `bucket` under `prefix` on
    /// this moto, reading S3 Inventory reports per `inventory` when given.
    pub fn lake_yaml(
        &self,
        bucket: &str,
        prefix: &str,
        inventory: Option<&adce_server::config::InventoryConfig>,
    ) -> String {
        let mut yaml = format!(
            "lake:
  s3:
    bucket: {bucket}
    prefix: \"{prefix}\"
    region: us-east-1
    endpoint: \"{endpoint}\"
    force_path_style: true
",
            endpoint = self.endpoint()
        );
        if let Some(inv) = inventory {
            yaml.push_str(&format!(
                "    inventory: {{bucket: {}, prefix: \"{}\", config_id: {}}}\n",
                inv.bucket, inv.prefix, inv.config_id
            ));
        }
        yaml
    }

    /// Runs `python tests/py/s3.py ENDPOINT ARGS` (bounded) with the test
    /// credentials.
    pub fn s3(&self, args: &[&str]) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(S3_SCRIPT);
        let mut command = Command::new(venv_tool("python"));
        command.arg(script).arg(self.endpoint()).args(args);
        for (key, value) in AWS_TEST_ENV {
            command.env(key, value);
        }
        run_bounded(&mut command, COMMAND_TIMEOUT)
    }

    /// Like [`MotoServer::s3`] but panics with stderr when it fails; stdout.
    pub fn s3_ok(&self, args: &[&str]) -> Vec<u8> {
        let output = self.s3(args);
        if !output.status.success() {
            panic!(
                "s3.py {} failed with {}:\n{}",
                args.join(" "),
                output.status,
                text(&output.stderr)
            );
        }
        output.stdout
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, name: &str) {
        self.s3_ok(&["create-bucket", name]);
    }

    /// `(key, size)` of every object under `prefix`, sorted by key.
    pub fn list(&self, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
        let stdout = self.s3_ok(&["list", bucket, prefix]);
        let listed: Value = serde_json::from_slice(&stdout)
            .unwrap_or_else(|e| panic!("s3.py list printed invalid JSON ({e}): {}", text(&stdout)));
        let mut out: Vec<(String, u64)> = listed
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|o| (json_text(&o["key"]), o["size"].as_u64().unwrap_or(u64::MAX)))
            .collect();
        out.sort();
        out
    }

    /// Every object under `prefix` with its bytes, read back one by one.
    pub fn dump(&self, bucket: &str, prefix: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
        let stdout = self.s3_ok(&["dump", bucket, prefix]);
        let dumped: Value = serde_json::from_slice(&stdout)
            .unwrap_or_else(|e| panic!("s3.py dump printed invalid JSON ({e}): {}", text(&stdout)));
        let Value::Object(objects) = dumped else {
            panic!("s3.py dump did not print an object: {}", text(&stdout));
        };
        objects
            .into_iter()
            .map(|(key, o)| {
                let body = decode_hex(o["body_hex"].as_str().unwrap_or_default())
                    .unwrap_or_else(|| panic!("s3.py dump gave bad hex for {key}"));
                (key, body)
            })
            .collect()
    }

    /// An object's bytes, or `None` when it does not exist.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let output = self.s3(&["get", bucket, key]);
        match output.status.code() {
            Some(0) => Some(output.stdout),
            Some(S3_MISSING_EXIT) => None,
            _ => panic!(
                "s3.py get {bucket} {key} failed with {}:\n{}",
                output.status,
                text(&output.stderr)
            ),
        }
    }

    /// Writes an object.
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let file = match tempfile::NamedTempFile::new_in(self.dir.path()) {
            Ok(file) => file,
            Err(e) => panic!("cannot create a temporary file for {key}: {e}"),
        };
        write_file(file.path(), bytes);
        self.s3_ok(&["put", bucket, key, &file.path().to_string_lossy()]);
    }

    /// Deletes objects.
    pub fn delete(&self, bucket: &str, keys: &[&str]) {
        let mut args = vec!["delete", bucket];
        args.extend_from_slice(keys);
        self.s3_ok(&args);
    }

    /// Uploads every file under `dir`, keyed by its path relative to `dir`;
    /// returns how many.
    pub fn upload_dir(&self, bucket: &str, dir: &Path) -> u64 {
        let stdout = self.s3_ok(&["upload-dir", bucket, &dir.to_string_lossy()]);
        text(&stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("s3.py upload-dir printed {:?} ({e})", text(&stdout)))
    }

    /// Writes an S3 Inventory report into `bucket` (through a local
    /// directory and [`MotoServer::upload_dir`]); returns its directory's key
    /// prefix.
    pub fn upload_report(
        &self,
        bucket: &str,
        report: adce_server::lake::inventory::testing::ReportBuilder,
    ) -> String {
        let staging = match tempfile::Builder::new()
            .prefix("report-")
            .tempdir_in(self.dir.path())
        {
            Ok(dir) => dir,
            Err(e) => panic!("cannot create a staging directory: {e}"),
        };
        let dir = match report.write_to(staging.path()) {
            Ok(dir) => dir,
            Err(e) => panic!("cannot write the inventory report: {e}"),
        };
        let uploaded = self.upload_dir(bucket, staging.path());
        assert!(uploaded > 0, "the inventory report had no files");
        dir
    }

    /// Keys of the multipart uploads started and neither completed nor aborted.
    pub fn multipart_uploads(&self, bucket: &str) -> Vec<String> {
        let stdout = self.s3_ok(&["multipart-uploads", bucket]);
        let keys: Value = serde_json::from_slice(&stdout).unwrap_or_else(|e| {
            panic!(
                "s3.py multipart-uploads printed invalid JSON ({e}): {}",
                text(&stdout)
            )
        });
        keys.as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(json_text)
            .collect()
    }
}

/// Waits (bounded) until something on `127.0.0.1:port` answers an HTTP
/// request, failing early when `proc` exits.
fn wait_http(proc: &mut Proc, port: u16) -> Result<(), String> {
    use std::io::Write;
    use std::net::TcpStream;

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    let max_polls = MOTO_READY_TIMEOUT.as_millis() / READY_POLL.as_millis() + 1;
    let mut last = String::from("no probe yet");
    for _ in 0..max_polls {
        if let Some(status) = proc.try_exit() {
            return Err(format!(
                "exited with {status}; log tail:\n{}",
                tail_lines(&proc.log(), LOG_TAIL_LINES)
            ));
        }
        let probe = TcpStream::connect_timeout(&addr, MOTO_PROBE_TIMEOUT).and_then(|mut stream| {
            stream.set_read_timeout(Some(MOTO_PROBE_TIMEOUT))?;
            stream.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
            let mut head = [0_u8; 8];
            stream.read_exact(&mut head)?;
            Ok(head)
        });
        match probe {
            Ok(head) if head.starts_with(b"HTTP/1.") => return Ok(()),
            Ok(head) => last = format!("unexpected answer {:?}", text(&head)),
            Err(e) => last = e.to_string(),
        }
        if started.elapsed() >= MOTO_READY_TIMEOUT {
            break;
        }
        thread::sleep(READY_POLL);
    }
    Err(format!(
        "no HTTP answer within {MOTO_READY_TIMEOUT:?} (last: {last})"
    ))
}

/// Bytes from lowercase or uppercase hex; `None` for anything else.
pub fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    hex.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digits = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(digits, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_hex_round_trips_and_refuses_garbage() {
        assert_eq!(decode_hex("00ff7F"), Some(vec![0, 255, 127]));
        assert_eq!(decode_hex(""), Some(Vec::new()));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
