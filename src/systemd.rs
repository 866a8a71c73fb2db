//! systemd integration without a library: `sd_notify` over `$NOTIFY_SOCKET`
//! (`READY=1`, `WATCHDOG=1`, `STOPPING=1`). Outside systemd every call is a no-op.

use std::os::unix::net::UnixDatagram;

fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::debug!("sd_notify {state}: {e}");
    }
}

pub fn ready() {
    notify("READY=1");
}

/// Fed by the scheduler loop: if the loop stops ticking, systemd restarts the service.
pub fn watchdog() {
    notify("WATCHDOG=1");
}

pub fn stopping() {
    notify("STOPPING=1");
}
