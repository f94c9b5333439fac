//! A resize reaches the frontend (issue 15): after the node grows, the export sends
//! VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend request channel the frontend opened,
//! and GET_CONFIG reads the new capacity. While an export is paused (as `block_resize` pauses
//! the exports of the node it changes) its queue takes no new request, another export's
//! queue goes on, and the paused one serves the waiting request when the pause ends.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::frontend::*;
use common::*;
use strata_backend::block_on;
use vhost::vhost_user::message::{BackendReq, VhostUserConfigFlags};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vm_memory::GuestMemoryMmap;

const MIB: u64 = 1 << 20;
const MEM: u64 = 1 << 20;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;

/// Capacity in 512-byte sectors, from the first 8 bytes of the config space.
fn capacity(fe: &mut Frontend) -> u64 {
    let (_, bytes) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .expect("get_config");
    u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// The request code of the next message on the backend request channel, if one comes.
fn backend_request(channel: &mut UnixStream) -> Option<u32> {
    channel
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("timeout");
    let mut hdr = [0u8; 12];
    channel.read_exact(&mut hdr).ok()?;
    Some(u32::from_le_bytes(hdr[..4].try_into().expect("4 bytes")))
}

#[test]
fn resize_sends_config_change_and_new_capacity() {
    let disk = Disk::new(MIB, "");
    let export = disk.export(|_| {});
    let (mut fe, _) = negotiate(&disk.socket(), u64::MAX);
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    fe.set_backend_request_fd(&theirs)
        .expect("set_backend_request_fd");
    drop(theirs);
    let mut channel = ours;
    assert_eq!(capacity(&mut fe), MIB / 512);

    block_on(disk.node.truncate(3 * MIB))
        .expect("reactor")
        .expect("truncate");
    assert!(export.notify_resize(), "the export says it sent the notice");
    assert_eq!(
        backend_request(&mut channel),
        Some(u32::from(BackendReq::CONFIG_CHANGE_MSG)),
        "a config-change message on the backend request channel"
    );
    assert_eq!(
        capacity(&mut fe),
        3 * MIB / 512,
        "GET_CONFIG after the resize"
    );
}

/// One queue of a connected frontend, with one read request it can queue.
struct Guest {
    mem: GuestMemoryMmap,
    _fe: Frontend,
    q: Vring,
}

impl Guest {
    fn connect(disk: &Disk) -> Guest {
        let mem = guest_memory(&[(0, MEM)]);
        let (mut fe, _) = negotiate_with_memory(&disk.socket(), u64::MAX, &mem);
        let q = Vring::setup(&mut fe, &mem, 0, 0, 16);
        Guest { mem, _fe: fe, q }
    }

    /// Queues a 4 KiB read of sector 0 and kicks (one at a time: it reuses descriptors 0-2).
    fn read(&mut self) {
        write_header(&self.mem, HDR, HDR + 16, T_IN, 0);
        let d = 0;
        self.q.desc(&self.mem, d, HDR, 16, F_NEXT, d + 1);
        self.q
            .desc(&self.mem, d + 1, DATA, 4096, F_NEXT | F_WRITE, d + 2);
        self.q.desc(&self.mem, d + 2, HDR + 16, 1, F_WRITE, 0);
        self.q.push(&self.mem, d);
    }

    fn completed_within(&mut self, timeout: Duration) -> bool {
        self.q.next_used(&self.mem, timeout).is_some()
    }
}

#[test]
fn a_paused_export_waits_and_others_go_on() {
    let a = Disk::new(MIB, "");
    let b = Disk::new(MIB, "");
    let export_a = a.export(|c| c.poll_max_ns = 0);
    let _export_b = b.export(|c| c.poll_max_ns = 0);
    let mut ga = Guest::connect(&a);
    let mut gb = Guest::connect(&b);
    ga.read();
    assert!(
        ga.completed_within(REPLY_TIMEOUT),
        "served before the pause"
    );

    let (pause, drained) = export_a.pause();
    assert!(drained);
    ga.read();
    gb.read();
    assert!(
        gb.completed_within(REPLY_TIMEOUT),
        "the other export goes on"
    );
    assert!(
        !ga.completed_within(Duration::from_millis(500)),
        "the paused export took a request"
    );
    let resumed = Instant::now();
    drop(pause);
    assert!(
        ga.completed_within(REPLY_TIMEOUT),
        "the waiting request is served after the pause, without another kick"
    );
    assert!(resumed.elapsed() < REPLY_TIMEOUT);
}
