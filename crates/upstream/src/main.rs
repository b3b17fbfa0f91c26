use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == upstream_backend_ns::INIT_ARG)
    {
        return ExitCode::from(upstream_backend_ns::init::main() as u8);
    }
    let backend = upstream_backend_ns::NamespaceBackend::new("/proc/self/exe".into()).unwrap();
    use upstream_sandbox::Backend;
    let mut sb = match backend.create(&upstream_sandbox::SandboxSpec::default()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(3);
        }
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let req = upstream_sandbox::ExecRequest {
        argv,
        env: vec![(
            "PATH".into(),
            "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into(),
        )],
        cwd: "/workspace".into(),
        timeout_ms: None,
    };
    let out = sb.exec(&req, &mut |_, d| {
        use std::io::Write;
        let _ = std::io::stdout().write_all(d);
    });
    eprintln!("{:?} setup {:?}", out, sb.info());
    ExitCode::SUCCESS
}
