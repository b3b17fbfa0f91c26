//! `upstream doctor`: what this host supports, and what upstream will use on it.

use std::fs;
use std::path::{Path, PathBuf};

use upstream_backend_ns::probe;
use upstream_sandbox::{ExecRequest, SandboxSpec};

struct Line {
    name: String,
    ok: bool,
    detail: String,
    hint: Option<String>,
}

pub fn doctor() -> u8 {
    let mut lines: Vec<Line> = probe::checks()
        .into_iter()
        .map(|c| Line {
            name: c.name.into(),
            ok: c.ok,
            detail: c.detail,
            hint: c.hint,
        })
        .collect();
    lines.push(kvm());
    lines.push(vmms());
    lines.push(vm());
    let sandbox = try_sandbox();
    let sandbox_ok = sandbox.ok;
    lines.push(sandbox);
    let width = lines.iter().map(|l| l.name.len()).max().unwrap_or(0);
    for line in &lines {
        let mark = if line.ok { "ok  " } else { "no  " };
        println!("{mark}{:width$}  {}", line.name, line.detail);
        if let (false, Some(hint)) = (line.ok, &line.hint) {
            println!("    {:width$}  hint: {hint}", "");
        }
    }
    println!();
    if sandbox_ok {
        println!("upstream will use: the namespace backend");
        crate::exit::OK
    } else {
        println!("upstream cannot make sandboxes on this host; see the hints above");
        crate::exit::SANDBOX
    }
}

fn try_sandbox() -> Line {
    let name = "sandbox".to_string();
    let result = crate::backends::open_here().and_then(|backend| {
        let mut sandbox = backend.create(&SandboxSpec::default())?;
        let request = ExecRequest {
            argv: vec!["/bin/true".into()],
            env: Vec::new(),
            cwd: "/".into(),
            timeout_ms: Some(10_000),
            files: Vec::new(),
            collect: None,
            user: None,
            ..Default::default()
        };
        let outcome = sandbox.exec(&request, &mut |_, _| {})?;
        let info = sandbox.info().clone();
        sandbox.destroy()?;
        Ok((outcome, info))
    });
    match result {
        Ok((outcome, info)) if outcome.status.success() => Line {
            name,
            ok: true,
            detail: format!(
                "a {} sandbox ran /bin/true (set up in {:.1} ms){}",
                info.backend,
                info.setup.as_secs_f64() * 1000.0,
                if info.unenforced.is_empty() {
                    String::new()
                } else {
                    format!("; {}", info.unenforced.join("; "))
                }
            ),
            hint: None,
        },
        Ok((outcome, _)) => Line {
            name,
            ok: false,
            detail: format!("/bin/true ended with {:?}", outcome.status),
            hint: None,
        },
        Err(e) => Line {
            name,
            ok: false,
            detail: e.to_string(),
            hint: e.hint().map(str::to_string),
        },
    }
}

/// Which VMM (and why), accelerator and guest kernel `isolation: vm` uses, and a boot of one.
fn vm() -> Line {
    let name = "vm".to_string();
    let config =
        match upstream_backend_vm::VmConfig::from_env(PathBuf::from("/proc/self/exe"), None) {
            Ok(config) => config,
            Err(e) => {
                return Line {
                    name,
                    ok: false,
                    detail: format!("`isolation: vm` is not available: {e}"),
                    hint: e.hint().map(str::to_string),
                };
            }
        };
    let what = format!(
        "{} at {} ({}), kernel {}",
        config.vmm.describe(),
        config.vmm_binary.display(),
        config.vmm_why,
        config.kernel.image.display()
    );
    let hint = match config.vmm.kind() {
        upstream_backend_vm::vmm::VmmKind::Qemu => {
            "with /dev/kvm that cannot boot a stock kernel, leave $UPSTREAM_VM_ACCEL unset (TCG)"
        }
        upstream_backend_vm::vmm::VmmKind::Firecracker => {
            "Firecracker needs hardware KVM and version 1.8 or later (it finds the guest's \
             devices through ACPI); $UPSTREAM_VMM=qemu runs QEMU instead"
        }
    };
    // What the VM's monitor is not held to here, said as a sandbox's `unenforced` says it.
    let unconfined: String = upstream_backend_vm::confine::unconfined_here()
        .iter()
        .map(|gap| format!("; {gap}"))
        .collect();
    match upstream_backend_vm::probe(&config) {
        Ok(took) => Line {
            name,
            ok: true,
            detail: format!(
                "{what}: a guest booted and powered off in {:.1} s{unconfined}; {}",
                took.as_secs_f64(),
                host_disk(&config)
            ),
            hint: None,
        },
        Err(e) => Line {
            name,
            ok: false,
            detail: format!("{what}: a guest did not boot: {e}"),
            hint: Some(hint.into()),
        },
    }
}

/// What the VM cache holds of the disk `image: host` VMs boot, in a clause.
fn host_disk(config: &upstream_backend_vm::VmConfig) -> String {
    use upstream_backend_vm::host_disk::DiskState;
    let size = upstream_doc::format_size;
    match upstream_backend_vm::host_disk_state(config) {
        Ok(DiskState::Made { path, taken }) => format!(
            "`image: host` VMs boot {} ({}), made of the host's files as they are",
            path.display(),
            size(taken)
        ),
        Ok(DiskState::Unmade { bytes, older }) => format!(
            "the next `image: host` VM first makes a disk of the host's /usr and /etc ({} to copy, minutes){}",
            size(bytes),
            if older {
                ": the host's files changed since the last one"
            } else {
                ""
            }
        ),
        Err(e) => format!("`image: host` VMs cannot be made: {e}"),
    }
}

fn kvm() -> Line {
    let name = "kvm".to_string();
    if !Path::new("/dev/kvm").exists() {
        return Line { name, ok: false, detail: "no /dev/kvm".into(), hint: Some("microVM backends need KVM: enable virtualization in the firmware and load kvm_intel or kvm_amd".into()) };
    }
    let modules = |m: &str| Path::new("/sys/module").join(m).exists();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_flags = cpuinfo.split_whitespace().any(|w| w == "vmx" || w == "svm");
    let access = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if (modules("kvm_intel") || modules("kvm_amd")) && hw_flags {
        Line {
            name,
            ok: access,
            detail: format!(
                "hardware KVM{}",
                if access {
                    ""
                } else {
                    " (no permission to open /dev/kvm)"
                }
            ),
            hint: (!access).then(|| "add yourself to the kvm group".into()),
        }
    } else if modules("kvm_pvm") {
        Line {
            name,
            ok: false,
            detail: "/dev/kvm is PVM (paravirtualized), which cannot boot a stock guest kernel"
                .into(),
            hint: Some(
                "microVMs need hardware KVM; QEMU under TCG works without it, slowly".into(),
            ),
        }
    } else {
        Line {
            name,
            ok: false,
            detail: "/dev/kvm exists but no hardware virtualization was found".into(),
            hint: Some("enable VT-x/AMD-V, or nested virtualization on a VM host".into()),
        }
    }
}

fn vmms() -> Line {
    let found: Vec<String> = [
        "firecracker",
        "cloud-hypervisor",
        "qemu-system-x86_64",
        "qemu-system-aarch64",
    ]
    .iter()
    .filter_map(|b| which(b).map(|p| format!("{b} ({})", p.display())))
    .collect();
    Line {
        name: "vmms".into(),
        ok: !found.is_empty(),
        detail: if found.is_empty() { "none found".into() } else { found.join(", ") },
        hint: Some("microVM isolation needs a VMM: install firecracker, or qemu-system-x86 (apt-get install qemu-system-x86)".into()),
    }
}

fn which(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}
