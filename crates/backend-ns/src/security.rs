//! The last steps of sandbox setup, run by the init inside the sandbox once its mounts are in
//! place: a cap on processes, no new privileges, capabilities cut to what the sandbox root
//! needs, and a seccomp filter refusing the system calls a sandbox never needs.
//!
//! The process cap is `RLIMIT_NPROC`, which the kernel counts per user (uid) per user
//! namespace, and every sandbox has a user namespace of its own. Sandbox processes cannot change
//! uid (CAP_SETUID and CAP_SETGID are dropped, set-uid binaries are inert under no_new_privs),
//! so every process of the sandbox counts against the one cap. Unlike a pids cgroup it needs no
//! cgroup migration, which on cgroup v1 hosts waits for an RCU grace period (~13 ms), and it
//! holds for rootless sandboxes too.

use std::collections::BTreeMap;

use caps::{Capability, CapsHashSet};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// Capabilities the sandbox root keeps (the set container runtimes grant by default). They act
/// only inside the sandbox's user namespace.
const KEPT: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETPCAP,
    Capability::CAP_SETFCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_RAW,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_MKNOD,
    Capability::CAP_AUDIT_WRITE,
];

/// System calls refused outright, with `EPERM`.
const DENIED: &[i64] = &[
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_open_by_handle_at,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_syslog,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_vhangup,
    libc::SYS_lookup_dcookie,
    libc::SYS_uselib,
    libc::SYS_ustat,
    libc::SYS_sysfs,
    libc::SYS_personality,
];

const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
    0x80, // CLONE_NEWTIME
];

/// Errors applying the sandbox's restrictions.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(nix::Error),
    #[error("cannot set the process cap: {0}")]
    Rlimit(nix::Error),
    #[error("cannot drop capabilities: {0}")]
    Capset(std::io::Error),
    #[error("cannot build the seccomp filter: {0}")]
    Filter(#[from] seccompiler::BackendError),
    #[error("cannot install the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// Applies every restriction to the calling process; its children inherit them.
/// `filters` are the compiled seccomp filters ([`filters`]), made ahead of time: the init
/// compiles them while it waits for its configuration.
pub fn lock_down(max_processes: Option<u64>, filters: &[BpfProgram]) -> Result<(), SecurityError> {
    if let Some(max) = max_processes {
        use nix::sys::resource::{Resource, setrlimit};
        setrlimit(Resource::RLIMIT_NPROC, max, max).map_err(SecurityError::Rlimit)?;
    }
    drop_capabilities()?;
    nix::sys::prctl::set_no_new_privs().map_err(SecurityError::NoNewPrivs)?;
    for filter in filters {
        seccompiler::apply_filter(filter)?;
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The kernel's `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// The kernel's `struct __user_cap_data_struct`.
#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn drop_capabilities() -> Result<(), SecurityError> {
    let kept: CapsHashSet = KEPT.iter().copied().collect();
    for cap in caps::all() {
        if !kept.contains(&cap) {
            // SAFETY: PR_CAPBSET_DROP takes a capability number and touches no memory. A
            // capability this kernel does not know fails with EINVAL, which is fine.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap.index() as libc::c_ulong, 0, 0, 0) };
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // Effective and permitted to the kept set, inheritable empty, in one capset.
    let mask = KEPT.iter().fold(0u64, |m, c| m | (1u64 << c.index()));
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: mask as u32,
            permitted: mask as u32,
            inheritable: 0,
        },
        CapData {
            effective: (mask >> 32) as u32,
            permitted: (mask >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads a v3 header and two data words, both valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if rc < 0 {
        return Err(SecurityError::Capset(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn arch() -> TargetArch {
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
    #[cfg(target_arch = "riscv64")]
    return TargetArch::riscv64;
    #[cfg(not(any(target_arch = "aarch64", target_arch = "riscv64")))]
    TargetArch::x86_64
}

const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_JMP: u16 = 0x05;
const BPF_JEQ: u16 = 0x10;
const BPF_JGE: u16 = 0x30;
const BPF_K: u16 = 0x00;
const BPF_RET: u16 = 0x06;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The filters, in the order they are installed.
pub fn filters() -> Result<Vec<BpfProgram>, SecurityError> {
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    // clone() with any namespace flag: a new namespace is a way around the ones we set up.
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    denied.insert(libc::SYS_clone, clone_rules);
    // TIOCSTI pushes characters into a terminal's input.
    denied.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::TIOCSTI,
        )?])?],
    );
    let deny = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch(),
    )?;
    let mut program: BpfProgram = deny.try_into()?;
    // Two checks run first, answering ENOSYS. clone3 passes its flags in memory, where a
    // filter cannot look: ENOSYS makes the C library fall back to clone(), which the rules
    // above check. And system calls of the x32 ABI carry bit 30 in their number, which would
    // get them past rules written for x86-64 numbers.
    let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    let first = [
        bpf(BPF_LD | BPF_W | BPF_ABS, 0, 0, 0), // the system call number
        bpf(BPF_JMP | BPF_JGE | BPF_K, 1, 0, X32_SYSCALL_BIT),
        bpf(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, libc::SYS_clone3 as u32),
        bpf(BPF_RET | BPF_K, 0, 0, enosys),
    ];
    program.splice(0..0, first);
    Ok(vec![program])
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_compile() {
        let filters = super::filters().expect("filters build");
        assert_eq!(
            filters.len(),
            1,
            "one filter: each installed filter runs on every syscall"
        );
        let first = &filters[0][..4];
        assert_eq!(first[1].k, super::X32_SYSCALL_BIT);
        assert_eq!(first[2].k, libc::SYS_clone3 as u32);
        assert_eq!(first[3].k, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
    }
}
