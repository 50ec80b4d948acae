//! End-to-end tests of adce: the real `adce-server`, `adce-agent` and
//! `adcectl` binaries on loopback ports, real scraper scripts from
//! `tests/scrapers/`, real files in temporary directories. One test binary so
//! the tests run in parallel threads; each uses its own ports and directories.
//! Run them through `scripts/test.sh`, which builds the binaries first and
//! provides the venv with grpcurl, the Python health client, moto_server and
//! boto3.

mod agent_hostile;
mod auth;
mod config;
mod confinement;
mod crash;
mod crash_cleanup;
mod dependent;
mod dev;
mod failures;
mod grpc;
mod health;
mod inventory;
mod lake;
mod limits;
mod live_coverage;
mod logs;
mod loopctl;
mod metrics;
mod priority;
mod reload;
mod retries;
mod routing;
mod s3;
mod shutdown;
