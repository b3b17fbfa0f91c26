//! The backends that isolate sandboxes, chosen at run time: the rest of the CLI holds them
//! as one [`SharedBackend`] that makes each sandbox with the backend its spec's isolation
//! names, and never names their types.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use upstream_sandbox::{
    Backend, Isolation, Kept, Sandbox, SandboxError, SandboxSpec, SharedBackend,
};

/// Namespaces always; a VM backend opened when a sandbox first asks for one (a host without
/// QEMU or a guest kernel runs namespace sandboxes all the same).
struct Backends {
    namespaces: SharedBackend,
    init_exe: PathBuf,
    vm: OnceLock<Result<SharedBackend, SandboxError>>,
}

impl Backends {
    fn vm(&self) -> Result<&SharedBackend, SandboxError> {
        let opened = self
            .vm
            .get_or_init(|| upstream_backend_vm::open(self.init_exe.clone(), None));
        match opened {
            Ok(backend) => Ok(backend),
            Err(e) => Err(SandboxError::setup(e.to_string(), e.hint())),
        }
    }

    /// The backend that made what `kept` names.
    fn of_kept(&self, kept: &Kept) -> Option<&SharedBackend> {
        if kept.backend() == self.namespaces.name() {
            return Some(&self.namespaces);
        }
        if kept.backend() == upstream_backend_vm::BACKEND_NAME {
            return self.vm().ok();
        }
        None
    }
}

impl Backend for Backends {
    fn name(&self) -> &str {
        self.namespaces.name()
    }

    fn create(&self, spec: &SandboxSpec) -> Result<Box<dyn Sandbox>, SandboxError> {
        match spec.isolation {
            Isolation::Namespaces => self.namespaces.create(spec),
            Isolation::Vm => self.vm()?.create(spec),
        }
    }

    fn prepare(&self, spec: &SandboxSpec) -> Result<(), SandboxError> {
        match spec.isolation {
            Isolation::Namespaces => self.namespaces.prepare(spec),
            Isolation::Vm => self.vm()?.prepare(spec),
        }
    }

    fn make_root(
        &self,
        spec: &SandboxSpec,
        making: &mut dyn FnMut(&str),
    ) -> Result<(), SandboxError> {
        match spec.isolation {
            Isolation::Namespaces => self.namespaces.make_root(spec, making),
            Isolation::Vm => self.vm()?.make_root(spec, making),
        }
    }

    fn discard_kept(&self, kept: &Kept) {
        if let Some(backend) = self.of_kept(kept) {
            backend.discard_kept(kept);
        }
    }

    fn kept(&self) -> Vec<Kept> {
        let mut kept = self.namespaces.kept();
        // A host that runs no VMs has kept none.
        if let Ok(vm) = self.vm() {
            kept.extend(vm.kept());
        }
        kept
    }

    fn label_kept(&self, kept: &Kept, label: &str) -> std::io::Result<()> {
        match self.of_kept(kept) {
            Some(backend) => backend.label_kept(kept, label),
            None => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }

    fn kept_label(&self, kept: &Kept) -> Option<(String, std::time::SystemTime)> {
        self.of_kept(kept)?.kept_label(kept)
    }

    fn remove_leftovers(&self) {
        self.namespaces.remove_leftovers();
        if let Some(Ok(vm)) = self.vm.get() {
            vm.remove_leftovers();
        }
    }
}

/// The backends for this host, their sandboxes running `init_exe` (this program) as their
/// init.
pub fn open(init_exe: PathBuf) -> Result<SharedBackend, SandboxError> {
    Ok(Arc::new(Backends {
        namespaces: upstream_backend_ns::open(init_exe.clone())?,
        init_exe,
        vm: OnceLock::new(),
    }))
}

/// [`open`] with this process's own binary, as the CLI runs it.
pub fn open_here() -> Result<SharedBackend, SandboxError> {
    open(PathBuf::from("/proc/self/exe"))
}
