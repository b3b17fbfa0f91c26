//! Whether this host's `/dev/kvm` runs a stock guest: the check behind choosing Firecracker,
//! which has no emulator to fall back on.
//!
//! Opening `/dev/kvm`, `KVM_GET_API_VERSION` and `KVM_CREATE_VM` all succeed on a
//! paravirtual KVM such as PVM (a `kvm_pvm` module serving guests built for it), and so do a
//! vCPU, real mode, firmware, a guest's own switch into 64-bit mode, an interrupt through its
//! IDT and its first `wrmsr` (all tried on this project's PVM machines). What gives PVM away
//! is speed: it emulates some instructions a stock kernel runs before its first line, a byte
//! at a time. Debian's kernel booted by QEMU under PVM sat for seconds in `clear_bss`, whose
//! `rep stosb` PVM ran at about a microsecond a byte (seen in the vCPU's registers), so the
//! guest never printed a line within a boot's time.
//!
//! So the check runs a guest of its own that does what such a kernel does first, as
//! Firecracker hands it the CPU: one vCPU with the host's CPUID, in 64-bit mode with paging,
//! at the kernel's base address (-2 GiB); it sets `EFER.SCE` as `startup_64` does, clears
//! [`CLEARED_LEN`] bytes with `rep stosb` as `clear_bss` does, writes a byte to a port and
//! halts. A KVM that runs stock guests exits with the byte, then the halt, within
//! [`SLOWEST`] (hardware does it in well under a millisecond; PVM took 200–300 ms). An error
//! from an ioctl, a shutdown or failed entry, a wrong byte, or a guest too slow at its best
//! of three tries is a KVM Firecracker cannot boot Debian's kernel on.

use std::time::Duration;

use kvm_ioctls::{Kvm, VcpuExit};

/// How long the probe guest may take: a KVM that hangs in `KVM_RUN` is not
/// waited for past it (its thread is left blocked; it holds nothing of this process's).
pub const RUN_WITHIN: Duration = Duration::from_secs(2);

/// The port and byte the probe guest writes.
const PROBE_PORT: u16 = 0x10;
const PROBE_BYTE: u8 = 42;
/// The probe guest's memory: 2 MiB from guest address 0, the code at [`CODE`] and the page
/// tables after it.
const MEMORY: usize = 2 << 20;
const CODE: u64 = 0x1000;
const PML4: u64 = 0x2000;
const PDPT: u64 = 0x3000;
const PD: u64 = 0x4000;
/// The memory the guest clears, as Linux clears its BSS before it prints a line.
const CLEARED: u64 = 0x10_0000;
const CLEARED_LEN: u64 = 0x4_0000;

/// The longest the guest may take to clear [`CLEARED_LEN`] bytes, at its best of
/// [`TRIES`]: hardware KVM takes well under a millisecond (tens of page faults), PVM about
/// 300 ms (it emulates `rep stosb` a byte at a time).
pub const SLOWEST: Duration = Duration::from_millis(50);
const TRIES: usize = 3;
/// Where an x86-64 Linux kernel runs: its text mapped at -2 GiB.
const KERNEL_BASE: u64 = 0xffff_ffff_8000_0000;

/// Why `/dev/kvm` does not run a stock guest, if it does not.
pub fn stock_guest_runs() -> Result<(), String> {
    let mut best: Option<Duration> = None;
    for _ in 0..TRIES {
        let took = run_within(RUN_WITHIN)?;
        if took <= SLOWEST {
            return Ok(());
        }
        best = Some(best.map_or(took, |b| b.min(took)));
    }
    let best = best.unwrap_or_default();
    Err(format!(
        "a guest took {} ms at best to clear {} KiB under /dev/kvm, where hardware takes well \
         under one: this KVM emulates what a stock kernel runs first (PVM does), and a \
         kernel clears megabytes before it prints a line",
        best.as_millis(),
        CLEARED_LEN >> 10
    ))
}

/// One run of the probe guest on a thread of its own, waited for up to `within`: how long
/// its `KVM_RUN`s took.
fn run_within(within: Duration) -> Result<Duration, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("kvm-probe".into())
        .spawn(move || {
            let _ = tx.send(run_probe_guest());
        });
    if let Err(e) = spawned {
        return Err(format!("cannot start the KVM check: {e}"));
    }
    match rx.recv_timeout(within) {
        Ok(result) => result,
        Err(_) => Err(format!(
            "a guest of a few instructions did not halt within {} s under /dev/kvm",
            within.as_secs()
        )),
    }
}

fn run_probe_guest() -> Result<Duration, String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(format!("/dev/kvm speaks API version {version}, not 12"));
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    let memory = Memory::new().map_err(|e| format!("cannot map the probe's memory: {e}"))?;
    // Page tables: the first 2 MiB of guest memory, as one large page, at virtual 0 and at
    // the kernel's base, -2 GiB (PML4 slot 511, PDPT slot 510).
    memory.write_u64(PML4, PDPT | 0x3);
    memory.write_u64(PML4 + 511 * 8, PDPT | 0x3);
    memory.write_u64(PDPT, PD | 0x3);
    memory.write_u64(PDPT + 510 * 8, PD | 0x3);
    memory.write_u64(PD, 0x83);
    let bss = (KERNEL_BASE + CLEARED).to_le_bytes();
    let len = (CLEARED_LEN as u32).to_le_bytes();
    #[rustfmt::skip]
    let code: [u8; 41] = [
        // rdmsr EFER; or eax, SCE; wrmsr: what Linux's startup_64 does first.
        0xb9, 0x80, 0x00, 0x00, 0xc0, // mov ecx, MSR_EFER
        0x0f, 0x32,                   // rdmsr
        0x0d, 0x01, 0x00, 0x00, 0x00, // or eax, EFER_SCE
        0x0f, 0x30,                   // wrmsr
        // Then clears memory as it clears its BSS.
        0x48, 0xbf, bss[0], bss[1], bss[2], bss[3], bss[4], bss[5], bss[6], bss[7], // mov rdi, bss
        0xb9, len[0], len[1], len[2], len[3], // mov ecx, len
        0x31, 0xc0,                   // xor eax, eax
        0xf3, 0xaa,                   // rep stosb
        0x66, 0xba, PROBE_PORT as u8, (PROBE_PORT >> 8) as u8, // mov dx, PROBE_PORT
        0xb0, PROBE_BYTE,             // mov al, PROBE_BYTE
        0xee,                         // out dx, al
        0xf4,                         // hlt
    ];
    memory.write(CODE, &code);
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEMORY as u64,
        userspace_addr: memory.addr() as u64,
        flags: 0,
    };
    // SAFETY: the region is the mapping `memory` holds, which outlives `vm` (declared
    // before it, so dropped after it): no guest runs on it once it is unmapped.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION failed: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU failed: {e}"))?;
    // The host's CPUID, as a VMM gives its guest (KVM's default is none at all).
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID failed: {e}"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| format!("KVM_SET_CPUID2 failed: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS failed: {e}"))?;
    // 64-bit mode at CPL 0 with paging on, as a VMM hands a kernel its first instruction.
    let code_segment = kvm_bindings::kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data_segment = kvm_bindings::kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code_segment
    };
    sregs.cs = code_segment;
    sregs.ds = data_segment;
    sregs.es = data_segment;
    sregs.fs = data_segment;
    sregs.gs = data_segment;
    sregs.ss = data_segment;
    sregs.cr3 = PML4;
    sregs.cr4 |= 1 << 5; // PAE
    sregs.cr0 |= 0x8000_0011; // PG, ET, PE
    sregs.efer |= 0x500; // LMA, LME
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS (64-bit mode) failed: {e}"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: KERNEL_BASE + CODE,
        rsp: KERNEL_BASE + CODE,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS failed: {e}"))?;
    let mut wrote = false;
    let started = std::time::Instant::now();
    for _ in 0..4 {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if port == PROBE_PORT && data == [PROBE_BYTE] => {
                wrote = true;
            }
            Ok(VcpuExit::Hlt) if wrote => return Ok(started.elapsed()),
            Ok(VcpuExit::Hlt) => {
                return Err("the guest halted without running its code".into());
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                return Err(format!(
                    "the guest wrote {data:?} to port {port:#x}, not [{PROBE_BYTE}] to {PROBE_PORT:#x}"
                ));
            }
            Ok(exit) => {
                return Err(format!(
                    "a guest at the kernel's base address exited with {exit:?} instead of running"
                ));
            }
            Err(e) => {
                return Err(format!(
                    "KVM_RUN of a guest at the kernel's base address failed: {e}"
                ));
            }
        }
    }
    Err("the guest neither wrote its byte nor halted".into())
}

/// The probe guest's memory, anonymous, unmapped when dropped.
struct Memory {
    addr: *mut libc::c_void,
}

impl Memory {
    fn new() -> std::io::Result<Memory> {
        // SAFETY: a fresh private anonymous mapping; no memory of this process is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEMORY,
                libc::PROT_READ | libc::PROT_WRITE,
                // Populated now, so that what the guest's run takes is the guest's.
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Memory { addr })
    }

    fn addr(&self) -> usize {
        self.addr as usize
    }

    /// Copies `bytes` to guest address `at`; what would fall past the memory is not copied.
    fn write(&self, at: u64, bytes: &[u8]) {
        let at = (at as usize).min(MEMORY);
        let len = bytes.len().min(MEMORY - at);
        // SAFETY: the mapping is MEMORY bytes, writable, and only this process's; the copy
        // stays within it (`at + len <= MEMORY`) and its source cannot overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.addr.cast::<u8>().add(at), len)
        }
    }

    fn write_u64(&self, at: u64, value: u64) {
        self.write(at, &value.to_le_bytes());
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `Memory::new` with this length and is unmapped once.
        unsafe {
            libc::munmap(self.addr, MEMORY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check's answer matches what the host's modules say its KVM is: PVM (this
    /// project's machines) cannot run a stock guest, hardware KVM can.
    #[test]
    fn the_check_tells_a_paravirtual_kvm_from_a_hardware_one() {
        let module = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
        let result = stock_guest_runs();
        if module("kvm_pvm") && !module("kvm_intel") && !module("kvm_amd") {
            let why = result.expect_err("a PVM KVM passed the check");
            assert!(why.contains("PVM does"), "{why}");
        } else if module("kvm_intel") || module("kvm_amd") {
            result.expect("hardware KVM failed the check");
        } else if std::path::Path::new("/dev/kvm").exists() {
            // A KVM of another kind: whatever it says is said in a sentence.
            if let Err(why) = result {
                assert!(!why.is_empty());
            }
        } else {
            let why = result.expect_err("no /dev/kvm passed the check");
            assert!(why.contains("/dev/kvm"), "{why}");
        }
    }
}
