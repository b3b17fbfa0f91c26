//! Limits through cgroups, set up from the host side before a sandbox (or a VM's monitor)
//! starts: memory, CPU and processes, as each user of this module asks. (The namespace
//! backend caps processes with `RLIMIT_NPROC` instead: see its `security` module.)
//!
//! Each controller is placed where this host has it: cgroup v2 when the unified hierarchy
//! offers the controller, else its v1 hierarchy (hybrid hosts mix the two). A sandbox's
//! cgroups are created below the cgroup upstream itself runs in, so the sandbox stays inside
//! any limit upstream was given. A limit that cannot be set is reported, never silently
//! dropped. Each cgroup's name starts with its owner's pid ([`owner_pid`]): the next upstream
//! removes the cgroups of one that is gone, and kills what still runs in those whose names
//! say for certain whose they were ([`owned_name`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A cgroup controller upstream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Memory,
    Cpu,
    Pids,
}

impl Controller {
    pub const ALL: [Controller; 3] = [Controller::Memory, Controller::Cpu, Controller::Pids];

    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
        }
    }
}

/// The limits a set of cgroups holds; `None` asks for no cgroup of that controller.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Wanted {
    /// Bytes of memory (and no swap).
    pub memory: Option<u64>,
    /// CPUs' worth of time per period.
    pub cpus: Option<f64>,
    /// Processes and threads.
    pub pids: Option<u64>,
}

impl Wanted {
    /// A sandbox's memory and CPU limits (its process limit is held another way).
    pub fn memory_and_cpus(limits: &crate::Limits) -> Wanted {
        Wanted {
            memory: limits.memory,
            cpus: limits.cpus,
            pids: None,
        }
    }
}

/// Which hierarchy a controller lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Where a controller can be used, as this process sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub controller: Controller,
    pub version: Version,
    /// The cgroup this process is in, in that hierarchy: sandboxes go below it.
    pub parent: PathBuf,
}

/// How the host offers each controller.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    pub placements: Vec<Placement>,
    /// Controllers found nowhere, or only where this process cannot use them, with why.
    pub missing: Vec<(Controller, String)>,
    /// Mount point of the unified (v2) hierarchy, if any.
    pub unified: Option<PathBuf>,
}

impl Layout {
    /// Reads /proc/self/mountinfo and /proc/self/cgroup.
    pub fn detect() -> Layout {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let membership = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Layout::from_tables(&mountinfo, &membership, |p| fs::read_to_string(p).ok())
    }

    fn from_tables(
        mountinfo: &str,
        membership: &str,
        read: impl Fn(&Path) -> Option<String>,
    ) -> Layout {
        let mut v1_mounts: Vec<(PathBuf, Vec<String>)> = Vec::new();
        let mut unified = None;
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(sep) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (Some(mount_point), Some(fstype), Some(options)) =
                (fields.get(4), fields.get(sep + 1), fields.get(sep + 3))
            else {
                continue;
            };
            match *fstype {
                "cgroup2" => unified = Some(PathBuf::from(mount_point)),
                "cgroup" => v1_mounts.push((
                    PathBuf::from(mount_point),
                    options.split(',').map(str::to_string).collect(),
                )),
                _ => {}
            }
        }
        let mut v2_path = None;
        let mut v1_paths: Vec<(Vec<String>, String)> = Vec::new();
        for line in membership.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if id == "0" && controllers.is_empty() {
                v2_path = Some(path.to_string());
            } else {
                v1_paths.push((
                    controllers.split(',').map(str::to_string).collect(),
                    path.to_string(),
                ));
            }
        }
        let mut layout = Layout {
            unified: unified.clone(),
            ..Layout::default()
        };
        for controller in Controller::ALL {
            let name = controller.name();
            if let (Some(mount), Some(path)) = (&unified, &v2_path) {
                let parent = mount.join(path.trim_start_matches('/'));
                let available = read(&parent.join("cgroup.controllers")).unwrap_or_default();
                if available.split_whitespace().any(|c| c == name) {
                    layout.placements.push(Placement {
                        controller,
                        version: Version::V2,
                        parent,
                    });
                    continue;
                }
            }
            let v1 = v1_mounts
                .iter()
                .find(|(_, opts)| opts.iter().any(|o| o == name))
                .and_then(|(mount, _)| {
                    let (_, path) = v1_paths
                        .iter()
                        .find(|(cs, _)| cs.iter().any(|c| c == name))?;
                    Some(mount.join(path.trim_start_matches('/')))
                });
            match v1 {
                Some(parent) => layout.placements.push(Placement {
                    controller,
                    version: Version::V1,
                    parent,
                }),
                None => layout
                    .missing
                    .push((controller, "no cgroup hierarchy offers it".into())),
            }
        }
        layout
    }

    pub fn placement(&self, controller: Controller) -> Option<&Placement> {
        self.placements.iter().find(|p| p.controller == controller)
    }

    /// Empties (kills what runs there) and removes the cgroups of sandboxes whose upstream
    /// is gone, in every hierarchy.
    pub fn remove_stale(&self) {
        for place in &self.placements {
            match place.version {
                Version::V1 => remove_stale(&place.parent),
                Version::V2 => remove_stale(&place.parent.join("upstream")),
            }
        }
    }
}

/// The cgroups of one sandbox.
#[derive(Debug, Default)]
pub struct Cgroups {
    /// One directory per hierarchy, with the version and the controllers it carries.
    dirs: Vec<(PathBuf, Version)>,
    memory: Option<(PathBuf, Version)>,
    /// Where each controller was placed.
    placed: Vec<(Controller, PathBuf)>,
}

/// Reads how many times the kernel killed a process of a sandbox for lack of memory.
#[derive(Debug, Clone)]
pub struct OomCounter(Option<(PathBuf, Version)>);

impl OomCounter {
    pub fn kills(&self) -> u64 {
        let Some((dir, version)) = &self.0 else {
            return 0;
        };
        let file = match version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines().find_map(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse().ok())
                })
            })
            .unwrap_or(0)
    }
}

/// What could not be limited, with why.
pub type Unenforced = Vec<String>;

const HINT: &str = "run as root, or under a delegated cgroup v2 subtree (systemd-run --user --scope -p Delegate=yes)";

impl Cgroups {
    /// Creates the sandbox's cgroups and sets its limits. Limits that cannot be set are
    /// returned as sentences.
    pub fn create(layout: &Layout, name: &str, limits: &Wanted) -> (Cgroups, Unenforced) {
        let mut cgroups = Cgroups::default();
        let mut unenforced = Vec::new();
        let wanted: [(Controller, bool, &str); 3] = [
            (Controller::Memory, limits.memory.is_some(), "memory"),
            (Controller::Cpu, limits.cpus.is_some(), "cpus"),
            (Controller::Pids, limits.pids.is_some(), "process"),
        ];
        for (controller, asked, what) in wanted {
            if !asked {
                continue;
            }
            let Some(place) = layout.placement(controller) else {
                unenforced.push(format!(
                    "{what} limit is not enforced: this host has no {} cgroup controller",
                    controller.name()
                ));
                continue;
            };
            match cgroups
                .place(place, name)
                .and_then(|dir| apply(&dir, place.version, controller, limits))
            {
                Ok(()) => {}
                Err(e) => unenforced.push(format!(
                    "{what} limit is not enforced: cannot use the {} cgroup ({e}); {HINT}",
                    controller.name()
                )),
            }
        }
        (cgroups, unenforced)
    }

    fn place(&mut self, place: &Placement, name: &str) -> io::Result<PathBuf> {
        let (base, dir) = match place.version {
            Version::V1 => (place.parent.clone(), place.parent.join(name)),
            Version::V2 => {
                // v2 lets only leaf cgroups hold processes: sandboxes share an `upstream`
                // node below ours, which has none, and enable controllers there.
                let base = place.parent.join("upstream");
                (base.clone(), base.join(name))
            }
        };
        if place.version == Version::V2 {
            match fs::create_dir(&base) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            enable_v2(&place.parent, &base, place.controller)?;
        }
        if !self.dirs.iter().any(|(d, _)| *d == dir) {
            remove_stale(&base);
            fs::create_dir(&dir)?;
            self.dirs.push((dir.clone(), place.version));
        }
        if place.controller == Controller::Memory {
            self.memory = Some((dir.clone(), place.version));
        }
        self.placed.push((place.controller, dir.clone()));
        Ok(dir)
    }

    /// Moves a process (and its future children) into every cgroup of the sandbox.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        for (dir, _) in &self.dirs {
            fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// The `cgroup.procs` file of each of the sandbox's cgroups: writing `0` to each moves
    /// the writer, which a child can do between fork and exec so that it never runs outside.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(dir, _)| dir.join("cgroup.procs"))
            .collect()
    }

    /// The sandbox's cgroup of `controller`, if it has one.
    pub fn dir_of(&self, controller: Controller) -> Option<&Path> {
        match controller {
            Controller::Memory => self.memory.as_ref().map(|(d, _)| d.as_path()),
            _ => self
                .placed
                .iter()
                .find(|(c, _)| *c == controller)
                .map(|(_, d)| d.as_path()),
        }
    }

    /// The processes in the sandbox's cgroups.
    pub fn processes(&self) -> Vec<i32> {
        let mut all: Vec<i32> = self.dirs.iter().flat_map(|(d, _)| pids_in(d)).collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// How many times the kernel has killed a process here for lack of memory.
    pub fn oom_kills(&self) -> u64 {
        self.oom_counter().kills()
    }

    /// What reads [`Cgroups::oom_kills`], for another thread.
    pub fn oom_counter(&self) -> OomCounter {
        OomCounter(self.memory.clone())
    }

    /// Kills whatever is left in the cgroups and removes them.
    pub fn destroy(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for (dir, _) in self.dirs.drain(..).rev() {
            if let Err(e) = empty_and_remove(&dir) {
                result = Err(e);
            }
        }
        self.memory = None;
        self.placed.clear();
        result
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let _ = self.destroy();
    }
}

fn enable_v2(parent: &Path, base: &Path, controller: Controller) -> io::Result<()> {
    let word = format!("+{}", controller.name());
    for dir in [parent, base] {
        let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        if !enabled.split_whitespace().any(|c| c == controller.name()) {
            fs::write(dir.join("cgroup.subtree_control"), &word)?;
        }
    }
    Ok(())
}

fn apply(dir: &Path, version: Version, controller: Controller, limits: &Wanted) -> io::Result<()> {
    let write = |file: &str, value: String| fs::write(dir.join(file), value);
    match (controller, version) {
        (Controller::Memory, Version::V1) => {
            let bytes = limits.memory.unwrap_or(u64::MAX);
            write("memory.limit_in_bytes", bytes.to_string())?;
            // With swap accounting, also keep the sandbox out of swap.
            if dir.join("memory.memsw.limit_in_bytes").exists() {
                write("memory.memsw.limit_in_bytes", bytes.to_string())?;
            }
            Ok(())
        }
        (Controller::Memory, Version::V2) => {
            write(
                "memory.max",
                limits.memory.map_or("max".into(), |b| b.to_string()),
            )?;
            if dir.join("memory.swap.max").exists() {
                write("memory.swap.max", "0".into())?;
            }
            Ok(())
        }
        (Controller::Pids, _) => write(
            "pids.max",
            limits.pids.map_or("max".into(), |n| n.to_string()),
        ),
        (Controller::Cpu, version) => {
            let period: u64 = 100_000;
            let quota = limits.cpus.map(|c| ((c * period as f64) as u64).max(1_000));
            match version {
                Version::V1 => {
                    write("cpu.cfs_period_us", period.to_string())?;
                    write(
                        "cpu.cfs_quota_us",
                        quota.map_or("-1".into(), |q| q.to_string()),
                    )
                }
                Version::V2 => write(
                    "cpu.max",
                    format!("{} {period}", quota.map_or("max".into(), |q| q.to_string())),
                ),
            }
        }
    }
}

fn pids_in(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn empty_and_remove(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for pid in pids_in(dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Removes cgroups left by an upstream process that died without cleaning up. Their names
/// carry the pid of the process that made them ([`owner_pid`]); a name made by
/// [`owned_name`] also carries its pid namespace and start time, so its owner is known to be
/// gone for certain, and whatever still runs there is killed first. What upstream starts
/// dies with it (a parent-death signal); this catches anything that outlived its owner
/// anyway. A name without them (a namespace sandbox's: its init dies with upstream) is only
/// removed once empty: its pid may be another pid namespace's.
fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match owner(name) {
            Owner::Alive | Owner::Unknown => {}
            Owner::Gone => {
                let _ = empty_and_remove(&entry.path());
            }
            Owner::GoneIfEmpty => {
                if pids_in(&entry.path()).is_empty() {
                    let _ = fs::remove_dir(entry.path());
                }
            }
        }
    }
}

/// The pid in a sandbox name `upstream-<pid>-<n>` (or [`owned_name`]'s).
pub fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix("upstream-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// A name for a cgroup (or anything else) of this process,
/// `upstream-<pid>-<kind>-<pid namespace>-<start time>-<n>`: what removes stale cgroups tells
/// this process from a later one given the same pid, and from one of another pid namespace.
pub fn owned_name(kind: &str, n: u32) -> String {
    let pid = std::process::id();
    let start = start_time(pid as i32).unwrap_or(0);
    format!("upstream-{pid}-{kind}-{}-{start}-{n}", pid_namespace())
}

/// What is known of a name's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Alive,
    /// Not upstream's name, or one of another pid namespace: not this process's to judge.
    Unknown,
    /// An [`owned_name`] of this pid namespace whose process is gone.
    Gone,
    /// A name with a pid only, which no process of this pid namespace has.
    GoneIfEmpty,
}

fn owner(name: &str) -> Owner {
    let Some(pid) = owner_pid(name) else {
        return Owner::Unknown;
    };
    let parts: Vec<&str> = name.split('-').collect();
    let owned = match parts.as_slice() {
        [_, _, kind, namespace, start, _]
            if kind.bytes().all(|b| b.is_ascii_alphabetic()) && !kind.is_empty() =>
        {
            match (namespace.parse::<u64>(), start.parse::<u64>()) {
                (Ok(namespace), Ok(start)) => Some((namespace, start)),
                _ => return Owner::Unknown,
            }
        }
        _ => None,
    };
    let running = kill(Pid::from_raw(pid), None).is_ok();
    match owned {
        Some((namespace, _)) if namespace != pid_namespace() => Owner::Unknown,
        Some((_, start)) if running && start_time(pid) == Some(start) => Owner::Alive,
        Some(_) => Owner::Gone,
        None if running => Owner::Alive,
        None => Owner::GoneIfEmpty,
    }
}

/// This process's pid namespace, by the inode of `/proc/self/ns/pid`.
fn pid_namespace() -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self/ns/pid").map_or(0, |m| m.ino())
}

/// When process `pid` started, in clock ticks since boot (`/proc/<pid>/stat`, field 22).
fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: fields count from its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
35 25 0:30 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
39 35 0:34 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
42 35 0:37 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
44 35 0:39 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "8:pids:/\n4:memory:/svc/abc\n1:cpu:/\n0::/\n";

    #[test]
    fn hybrid_hosts_use_v1_for_controllers_v2_lacks() {
        let layout = Layout::from_tables(HYBRID_MOUNTS, HYBRID_CGROUP, |_| Some(String::new()));
        let memory = layout.placement(Controller::Memory).unwrap();
        assert_eq!(memory.version, Version::V1);
        assert_eq!(
            memory.parent,
            PathBuf::from("/sys/fs/cgroup/memory/svc/abc")
        );
        assert_eq!(
            layout.placement(Controller::Cpu).unwrap().parent,
            PathBuf::from("/sys/fs/cgroup/cpu")
        );
        assert_eq!(
            layout.unified,
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn v2_is_preferred_where_it_offers_the_controller() {
        let mounts = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let layout = Layout::from_tables(mounts, "0::/user.slice/app\n", |p| {
            (p == Path::new("/sys/fs/cgroup/user.slice/app/cgroup.controllers"))
                .then(|| "cpu memory pids\n".to_string())
        });
        for c in Controller::ALL {
            let p = layout.placement(c).unwrap();
            assert_eq!(p.version, Version::V2);
            assert_eq!(p.parent, PathBuf::from("/sys/fs/cgroup/user.slice/app"));
        }
    }

    #[test]
    fn missing_controllers_are_named() {
        let layout = Layout::from_tables("", "", |_| None);
        assert!(layout.placements.is_empty());
        assert_eq!(layout.missing.len(), 3);
    }

    #[test]
    fn sandbox_names_carry_their_owner() {
        assert_eq!(owner_pid("upstream-1234-7"), Some(1234));
        assert_eq!(owner_pid("other"), None);
    }

    #[test]
    fn a_name_with_a_start_time_is_alive_only_for_the_process_that_made_it() {
        let mine = owned_name("vm", 3);
        let me = std::process::id();
        assert_eq!(owner_pid(&mine), Some(me as i32));
        assert_eq!(owner(&mine), Owner::Alive, "{mine}");
        // The same pid, started at another time: a process that came after the owner.
        let start = start_time(me as i32).unwrap();
        let ns = pid_namespace();
        let later = format!("upstream-{me}-vm-{ns}-{}-3", start + 1);
        assert_eq!(owner(&later), Owner::Gone, "{later}");
        // Another pid namespace's: not this process's to judge.
        let other = format!("upstream-{me}-vm-{}-{}-3", ns + 1, start + 1);
        assert_eq!(owner(&other), Owner::Unknown, "{other}");
        // A name with a pid only goes by its pid, and is removed only once empty.
        assert_eq!(owner(&format!("upstream-{me}-3")), Owner::Alive);
        assert_eq!(
            owner(&format!("upstream-{}-3", i32::MAX)),
            Owner::GoneIfEmpty
        );
        assert_eq!(owner("upstream-x-vm-1-2-3"), Owner::Unknown);
        assert_eq!(owner("something-else"), Owner::Unknown);
    }
}
