//! Network changes from the kernel (rtnetlink): a link going up or down, an
//! address or a route added or removed. The MQTT client and the downloader
//! wait out their backoff on this too, so a gateway whose link comes back
//! reconnects at once instead of sleeping through a long random delay.
//!
//! Messages are not parsed: any message in the subscribed groups is a
//! change worth one early attempt.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// RTMGRP_* multicast groups (linux/rtnetlink.h).
const GROUPS: u32 = libc::RTMGRP_LINK as u32
    | libc::RTMGRP_IPV4_IFADDR as u32
    | libc::RTMGRP_IPV4_ROUTE as u32
    | libc::RTMGRP_IPV6_IFADDR as u32
    | libc::RTMGRP_IPV6_ROUTE as u32;

pub struct NetChanges {
    socket: AsyncFd<OwnedFd>,
}

impl NetChanges {
    /// Subscribes to link, address and route changes in this process's
    /// network namespace. Must be called inside a tokio runtime.
    pub fn open() -> io::Result<Self> {
        use nix::sys::socket::{bind, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType};
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, GROUPS))?;
        // SAFETY: an OwnedFd stays open, and names the same socket, for as
        // long as the AsyncFd that owns it.
        let socket = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { socket })
    }

    /// Waits for the next change, then drains what else is queued (one
    /// `ip link set up` brings several messages; they count as one).
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buffer = [0u8; 8192];
        loop {
            let mut ready = self.socket.readable().await?;
            let mut any = false;
            loop {
                use nix::errno::Errno;
                use nix::sys::socket::{recv, MsgFlags};
                match recv(self.socket.get_ref().as_raw_fd(), &mut buffer, MsgFlags::MSG_DONTWAIT) {
                    Ok(n) if n > 0 => {
                        any = true;
                        continue;
                    }
                    Ok(_) => {}
                    // The kernel dropped messages for us: certainly a change.
                    Err(Errno::ENOBUFS) => any = true,
                    Err(Errno::EINTR) => continue,
                    Err(Errno::EAGAIN) => {}
                    Err(e) => return Err(e.into()),
                }
                break;
            }
            ready.clear_ready();
            if any {
                return Ok(());
            }
        }
    }
}

/// Sleeps for `wait`, or less when the network changes first (true then).
/// Without a netlink socket (refused by a sandbox) it simply sleeps.
pub async fn sleep_or_change(wait: std::time::Duration, changes: &mut Option<NetChanges>) -> bool {
    let Some(watch) = changes.as_mut() else {
        tokio::time::sleep(wait).await;
        return false;
    };
    tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        changed = watch.changed() => match changed {
            Ok(()) => true,
            Err(_) => {
                *changes = None;
                false
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A change in our own namespace wakes the waiter long before its
    /// timer. Needs root (a new network namespace with a dummy link).
    #[test]
    fn a_link_change_cuts_the_wait_short() {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            eprintln!("SKIP: needs root (unshare a network namespace)");
            return;
        }
        // A thread of our own in a fresh namespace: nothing else changes there.
        let woke = std::thread::spawn(|| {
            // SAFETY: moves only this thread into a new network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "{}", io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let mut changes = Some(NetChanges::open().unwrap());
                // Quiet namespace: the timer ends the wait.
                assert!(!sleep_or_change(Duration::from_millis(200), &mut changes).await);
                // The loopback link coming up is a change.
                // SAFETY: getpid/gettid have no preconditions.
                let ns =
                    format!("/proc/{}/task/{}/ns/net", unsafe { libc::getpid() }, unsafe { libc::gettid() });
                let up = std::process::Command::new("nsenter")
                    .arg(format!("--net={ns}"))
                    .args(["ip", "link", "set", "lo", "up"])
                    .status()
                    .unwrap();
                assert!(up.success());
                let started = std::time::Instant::now();
                let woke = sleep_or_change(Duration::from_secs(60), &mut changes).await;
                (woke, started.elapsed())
            })
        })
        .join()
        .unwrap();
        assert!(woke.0, "no wake-up");
        assert!(woke.1 < Duration::from_secs(60));
    }
}
