//! A shorter scheduler time slice for the worker threads (`server.worker_slice_us`).
//!
//! On a machine whose cores graphgate shares (with the service that calls it, a sidecar, a
//! load generator), a worker woken by a request waits for whatever holds its core to finish
//! its slice. Linux's EEVDF scheduler (6.12 and later) lets a thread ask for a shorter slice:
//! it gets an earlier deadline, so it runs sooner after waking, and is preempted sooner if
//! it runs long. Its share of the CPU (its weight, set by nice) does not change. A worker
//! spends a few microseconds per request and then waits again, which is the work this suits.
//! Before 6.12 the kernel reads `sched_runtime` only for the deadline policy, so there the
//! request changes nothing (only 6.18 has been run here).

use std::io;
use std::time::Duration;

/// Asks the scheduler for `slice` on the calling thread, keeping its policy and nice value;
/// does nothing to a thread under a real-time or deadline policy set by the operator.
#[cfg(target_os = "linux")]
pub fn request_for_this_thread(slice: Duration) -> io::Result<()> {
    let mut attr = attr_of(0)?;
    if attr.sched_policy != libc::SCHED_OTHER as u32
        && attr.sched_policy != libc::SCHED_BATCH as u32
    {
        return Ok(());
    }
    attr.sched_runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: `attr` is a valid `sched_attr` read back from the kernel with one field changed;
    // pid 0 is the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn request_for_this_thread(_slice: Duration) -> io::Result<()> {
    Ok(())
}

/// The slice the kernel reports for thread `tid` of this process (0: the calling thread):
/// the one asked for, or the kernel's default.
#[cfg(target_os = "linux")]
pub fn of_thread(tid: libc::pid_t) -> io::Result<Duration> {
    Ok(Duration::from_nanos(attr_of(tid)?.sched_runtime))
}

#[cfg(not(target_os = "linux"))]
pub fn of_thread(_tid: i32) -> io::Result<Duration> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Does the running kernel keep a per-thread slice (Linux 6.12 and later)?
pub fn kernel_keeps_custom_slices() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release.trim().split(['.', '-']);
    let mut number = || {
        parts
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0)
    };
    (number(), number()) >= (6, 12)
}

/// Thread `tid`'s scheduling attributes (policy, nice, slice), as `sched_getattr` reports
/// them, with `size` set for passing them back.
#[cfg(target_os = "linux")]
fn attr_of(tid: libc::pid_t) -> io::Result<libc::sched_attr> {
    let size = std::mem::size_of::<libc::sched_attr>() as u32;
    // SAFETY: a plain-data struct for which all-zero bytes are a valid value.
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    // SAFETY: `attr` is a writable `sched_attr` of `size` bytes.
    let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, tid, &mut attr, size, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    attr.size = size;
    Ok(attr)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_thread_gets_the_slice_it_asks_for_and_keeps_its_nice_value() {
        std::thread::spawn(|| {
            // SAFETY: sets the calling thread's nice value (raising it needs no privilege).
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 5) };
            request_for_this_thread(Duration::from_micros(250)).expect("sched_setattr");
            if kernel_keeps_custom_slices() {
                assert_eq!(of_thread(0).unwrap(), Duration::from_micros(250));
            }
            // SAFETY: reads the calling thread's nice value.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            assert_eq!(nice, 5);
        })
        .join()
        .unwrap();
    }
}
