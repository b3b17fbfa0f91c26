//! The backend conformance suite: what every backend promises, written once and run against
//! each backend this machine has.
//!
//! Each test is a function of a [`harness::Bench`] (a backend, made fresh for the test with a
//! runtime directory of its own) and is instantiated once per case below. A backend joins by
//! adding a function to `harness.rs` that makes it and a line to [`cases`]: nothing else in
//! the suite names a backend. Tests that need what a machine lacks say so on a `SKIPPED`
//! line; as root or in CI only missing hardware may skip.

// Tests report skips on stderr by design.
#![allow(clippy::print_stderr)]

mod harness;

mod artifacts;
mod background;
mod exec;
mod files;
mod limits;
mod network;
mod sessions;
mod snapshots;
mod timeouts;

/// One `#[test]` per conformance test for the case `$case` (a function of `harness`).
macro_rules! conformance {
    ($case:ident) => {
        conformance!(@tests $case:
            exec::exit_codes_and_signals,
            exec::stdin_environment_and_working_directory,
            exec::a_command_runs_as_a_user_of_the_sandbox,
            exec::output_streams_in_order_as_it_arrives,
            exec::request_files_go_in_first_and_collect_reads_one_back,
            exec::request_files_get_their_mode_and_a_user_may_write_one_made_for_all,
            exec::an_interrupt_stops_a_running_command,
            exec::a_sandbox_made_on_a_thread_that_ends_keeps_running,
            background::background_commands_spawn_write_their_output_and_are_waited_for,
            background::a_signal_reaches_a_background_commands_process_group,
            background::stop_processes_ends_every_command_and_keeps_the_sandbox,
            timeouts::a_command_past_its_timeout_is_killed,
            timeouts::a_sandbox_timeout_kills_everything_a_command_timeout_only_its_group,
            limits::a_command_over_the_memory_limit_is_out_of_memory,
            limits::a_fork_bomb_stays_within_the_process_limit,
            sessions::sessions_run_commands_alongside_the_sandbox_and_each_other,
            sessions::many_sessions_are_open_at_once_and_taken_again,
            files::small_files_move_in_and_out_with_their_metadata,
            files::a_gibibyte_streams_in_and_out_in_flat_memory,
            files::links_and_dot_dot_never_lead_out_of_the_sandbox,
            files::the_kernels_files_and_the_hosts_bound_directories_are_refused,
            files::owners_are_told_as_ids_of_the_sandbox,
            artifacts::artifacts_round_trip_with_modes_times_links_and_directories,
            artifacts::a_kept_workspace_is_where_the_next_sandbox_resumes,
            network::without_network_only_loopback_and_the_host_is_unreachable,
            network::with_the_hosts_network_the_host_answers_and_a_resolver_is_named,
        );
    };
    (@tests $case:ident: $($module:ident::$test:ident),* $(,)?) => {
        mod $case {
            $(
                #[test]
                fn $test() {
                    crate::harness::run(crate::harness::$case, crate::$module::$test);
                }
            )*
        }
    };
}

/// Every backend the suite runs against, one line each, with its maker in `harness.rs`.
mod cases {
    conformance!(namespaces_host_files);
    conformance!(namespaces_agent_files);
    conformance!(vm);
    conformance!(vm_restored);
}
