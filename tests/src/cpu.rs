//! CPU time (user + system) of processes, for benchmarks that compare what
//! two ways of doing the same work cost the machine, not only how long.

/// CPU seconds process `pid` has used so far (in clock ticks, usually
/// 10 ms); `None` when it cannot be read.
pub fn of_pid(pid: u32) -> Option<f64> {
    use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
    let pid = Pid::from_u32(pid);
    let mut sys = System::new().ok()?;
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        true,
        ProcessRefreshKind::nothing().with_cpu(),
    );
    sys.process(pid)
        .map(|p| p.accumulated_cpu_time() as f64 / 1000.0)
}

/// CPU seconds used by the children of this process that have been
/// waited for (`getrusage(RUSAGE_CHILDREN)`): the difference around
/// running one child to completion is that child's.
pub fn of_waited_children() -> f64 {
    // SAFETY: getrusage fills the struct it is given; zeroed is valid.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_of_a_busy_child_is_counted() {
        let before = super::of_waited_children();
        let st = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(st.success());
        let used = super::of_waited_children() - before;
        assert!(used > 0.0, "{used}");
        let me = super::of_pid(std::process::id()).unwrap();
        assert!(me >= 0.0);
        assert_eq!(super::of_pid(u32::MAX), None);
    }
}
