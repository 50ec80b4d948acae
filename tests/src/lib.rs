//! Harness for the adce end-to-end tests. Tests start the real binaries as
//! processes on loopback ports and look at them from outside; the harness is
//! split by what it drives, each module importing only the ones listed
//! before it:
//!
//! - `files`: [`TestDir`], temporary directories with configs and the test
//!   scrapers, and file helpers;
//! - `process`: the built binaries and venv tools, free ports, [`Proc`] (a
//!   child process stopped by its pid), bounded commands and waits;
//! - `ctl`: `adcectl` runs and its `--json` output;
//! - `server`: test configs and [`ServerProc`] (`adce-server`);
//! - `agent`: [`AgentProc`] (`adce-agent`);
//! - `s3`: [`MotoServer`] (`moto_server` and the boto3 client `tests/py/s3.py`);
//! - [`raw_agent`]: a hand-made agent for tests that need to misbehave where
//!   the real one never does, or to drive a gateway message by message;
//! - [`pki`]: test certificates.
//!
//! Everything but `raw_agent` and `pki` is re-exported here, so tests write
//! `use adce_tests::{ServerProc, TestDir, …}`.
//!
//! Architecture invariant: every process the harness starts is owned by a
//! value whose `Drop` kills it by its own pid, and every wait is bounded in
//! both count and time.

mod agent;
mod ctl;
mod files;
pub mod pki;
mod process;
pub mod raw_agent;
mod s3;
mod server;

pub use agent::AgentProc;
pub use ctl::{
    TASK_STATE_TIMEOUT, all_tasks, count, count_state, coverage_percent, ctl, ctl_json, json_text,
    lake_complete, log_entries, state_of, status, task_id, try_ctl_json, wait_only_task,
};
pub use files::{
    KEEP_ENV, TestDir, create_dir_all, files_under, read_or_empty, scrapers_dir, write_file,
};
pub use process::{
    COMMAND_TIMEOUT, LOG_TAIL_LINES, Proc, TERMINATE_TIMEOUT, VENV_ENV, bin, free_addr, free_port,
    peak_rss_kib, run_bounded, tail_lines, text, venv, venv_tool, wait_until, wait_with_timeout,
};
pub use s3::{AWS_TEST_ENV, MOTO_READY_TIMEOUT, MotoServer, decode_hex};
pub use server::{SERVER_READY_TIMEOUT, ServerProc, base_config, health_check, s3_config};
