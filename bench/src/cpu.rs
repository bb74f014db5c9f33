//! CPU time used by this process and by the benchmark's PostgreSQL server, from `/proc`: on two
//! shared cores, where an append's time goes is mostly a question of whose CPU it burns.

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU seconds (user + system) used so far by this process, and by the server started by
/// `scripts/with-postgres` (its postmaster and every child; `None` elsewhere, as with a
/// `DATABASE_URL` of one's own).
pub(crate) fn used() -> (f64, Option<f64>) {
    let client = stat("self").map_or(0.0, |s| s.cpu);
    (client, server())
}

struct Stat {
    parent: u32,
    cpu: f64,
    /// CPU of its children that have ended and been waited for.
    ended_children: f64,
}

fn stat(pid: &str) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it start with the state (field 3).
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let parent = fields.get(1)?.parse().ok()?;
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let cutime: f64 = fields.get(13)?.parse().ok()?;
    let cstime: f64 = fields.get(14)?.parse().ok()?;
    Some(Stat { parent, cpu: (utime + stime) / TICKS, ended_children: (cutime + cstime) / TICKS })
}

fn server() -> Option<f64> {
    let data = std::env::var("ANNAL_PG_DATA").ok()?;
    let pid_file = std::fs::read_to_string(format!("{data}/postmaster.pid")).ok()?;
    let postmaster: u32 = pid_file.lines().next()?.trim().parse().ok()?;
    let main = stat(&postmaster.to_string())?;
    let mut total = main.cpu + main.ended_children;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        if let Some(s) = stat(pid).filter(|s| s.parent == postmaster) {
            total += s.cpu;
        }
    }
    Some(total)
}
