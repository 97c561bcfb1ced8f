//! The data directory of a streaming standby of a local cluster: made by `pg_basebackup -R` where
//! the installation has it, else by the server's own low-level backup (a copy of the data
//! directory between its backup start and stop, streaming from a replication slot of its own) —
//! installations that carry only `initdb`, `pg_ctl` and `postgres` (the npm registry's server
//! packages, say) make standbys too.

use std::io;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::Local;
use super::process::run_quietly;

/// Fills `data` (under `root`, not yet existing) with a standby of `primary`.
pub(super) fn make(primary: &Local, data: &Path, root: &Path) -> io::Result<()> {
    let basebackup = primary.bin.join("pg_basebackup");
    if !basebackup.is_file() {
        return copy(primary, data, root);
    }
    let mut cmd = Command::new(basebackup);
    cmd.arg("-D")
        .arg(data)
        .args([
            "-R",
            "-X",
            "stream",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
        ])
        .arg(primary.port.to_string());
    run_quietly(cmd, root, primary.run_as, Duration::from_secs(120))
}

/// Copies `primary`'s data directory into `data` within a low-level backup, and configures the
/// copy to stream from a physical replication slot made for it.
fn copy(primary: &Local, data: &Path, root: &Path) -> io::Result<()> {
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        primary.port
    );
    let mut client = postgres::Client::connect(&url, postgres::NoTls).map_err(io::Error::other)?;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .map_err(io::Error::other)?
        .get(0);
    // Unique per standby: the root directory's name, made of letters, digits and dashes.
    let slot = root
        .file_name()
        .map(|n| n.to_string_lossy().replace('-', "_"))
        .unwrap_or_else(|| "distlock_standby".to_owned());
    client
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true)",
            &[&slot],
        )
        .map_err(io::Error::other)?;
    let (start, stop) = if version >= 150_000 {
        (
            "SELECT pg_backup_start('distlock standby', true)",
            "SELECT labelfile FROM pg_backup_stop(true)",
        )
    } else {
        (
            "SELECT pg_start_backup('distlock standby', true, false)",
            "SELECT labelfile FROM pg_stop_backup(false, true)",
        )
    };
    client.batch_execute(start).map_err(io::Error::other)?;
    let copied = shell(
        primary,
        root,
        r#"mkdir -p "$1" && cp -a "$0"/. "$1" && chmod 700 "$1" &&
           rm -rf "$1"/postmaster.pid "$1"/postmaster.opts "$1"/pg_replslot/*"#,
        &[primary.data.as_os_str(), data.as_os_str()],
    );
    // The backup ends whether or not the copy worked.
    let label: String = client
        .query_one(stop, &[])
        .map_err(io::Error::other)?
        .get(0);
    copied?;
    let conf = format!(
        "primary_conninfo = 'host=127.0.0.1 port={} user=postgres'\nprimary_slot_name = '{slot}'\n",
        primary.port
    );
    shell(
        primary,
        root,
        r#"printf '%s' "$1" > "$0"/backup_label && printf '%s' "$2" >> "$0"/postgresql.auto.conf &&
           : > "$0"/standby.signal"#,
        &[data.as_os_str(), label.as_ref(), conf.as_ref()],
    )
}

/// Runs the shell `script` with `args` ($0, $1, …) as the server's user.
fn shell(primary: &Local, root: &Path, script: &str, args: &[&std::ffi::OsStr]) -> io::Result<()> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).args(args);
    run_quietly(cmd, root, primary.run_as, Duration::from_secs(120))
}
