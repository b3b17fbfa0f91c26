//! Memory and CPU limits through cgroups, set up from the host side before the sandbox starts.
//! (The process cap is not a cgroup: see `security`.)
//!
//! Each controller is placed where this host has it: cgroup v2 when the unified hierarchy
//! offers the controller, else its v1 hierarchy (hybrid hosts mix the two). A sandbox's
//! cgroups are created below the cgroup upstream itself runs in, so the sandbox stays inside
//! any limit upstream was given. A limit that cannot be set is reported, never silently
//! dropped.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use upstream_sandbox::Limits;

/// A cgroup controller upstream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Memory,
    Cpu,
}

impl Controller {
    pub const ALL: [Controller; 2] = [Controller::Memory, Controller::Cpu];

    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
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

    /// Removes the empty cgroups of sandboxes whose upstream is gone, in every hierarchy.
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
    pub fn create(layout: &Layout, name: &str, limits: &Limits) -> (Cgroups, Unenforced) {
        let mut cgroups = Cgroups::default();
        let mut unenforced = Vec::new();
        let wanted: [(Controller, bool, String); 2] = [
            (Controller::Memory, limits.memory.is_some(), "memory".into()),
            (Controller::Cpu, limits.cpus.is_some(), "cpus".into()),
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
        Ok(dir)
    }

    /// Moves a process (and its future children) into every cgroup of the sandbox.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        for (dir, _) in &self.dirs {
            fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
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

fn apply(dir: &Path, version: Version, controller: Controller, limits: &Limits) -> io::Result<()> {
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

/// Removes cgroups left by an upstream process that died without cleaning up: their names
/// carry the pid of the process that made them.
fn remove_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(owner_pid) else {
            continue;
        };
        let alive = kill(Pid::from_raw(owner), None).is_ok();
        if !alive && pids_in(&entry.path()).is_empty() {
            let _ = fs::remove_dir(entry.path());
        }
    }
}

/// The pid in a sandbox name `upstream-<pid>-<n>`.
pub fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix("upstream-")?
        .split('-')
        .next()?
        .parse()
        .ok()
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
        assert_eq!(layout.missing.len(), 2);
    }

    #[test]
    fn sandbox_names_carry_their_owner() {
        assert_eq!(owner_pid("upstream-1234-7"), Some(1234));
        assert_eq!(owner_pid("other"), None);
    }
}
