//! Memory table changes while I/O runs (issue 17, item 5): one thread keeps writes and reads
//! flowing on a queue whose rings and buffers lie in region A, while the frontend adds and
//! removes region B (ADD_MEM_REG / REM_MEM_REG) and replaces the whole table (SET_MEM_TABLE).
//! Every request on region A completes with its data; a request into region B is served while
//! B is in the table and refused with IOERR once it is gone, never served from a stale mapping.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::frontend::*;
use common::*;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DISK: u64 = 16 << 20;
const QSIZE: u16 = 64;
const REGION_A: u64 = 1 << 20;
/// Region B: 1 MiB at 16 MiB, far from A so that no buffer can run from one into the other.
const REGION_B_GPA: u64 = 16 << 20;
const REGION_B: u64 = 1 << 20;
/// Queue 0's rings at 0, queue 1's at 64 KiB (both in region A).
const QUEUE1_BASE: u64 = 0x1_0000;
/// Queue 0's requests: headers and status bytes, then write and read buffers.
const FLOW_HDR: u64 = 0x2_0000;
const FLOW_WRITE: u64 = 0x4_0000;
const FLOW_READ: u64 = 0x8_0000;
/// Requests queue 0 keeps in flight, 4 KiB each, at sectors 0.. of the disk.
const FLOW_BATCH: u16 = 8;
/// Queue 1's one request: header and status in region A, data in region B.
const PROBE_HDR: u64 = 0x3_0000;
const PROBE_DATA: u64 = REGION_B_GPA + 0x1000;
/// Where queue 1 writes on the disk: after queue 0's range.
const PROBE_SECTOR: u64 = 4096;

/// Queue 0's work, in a loop until `stop`: FLOW_BATCH writes of a pattern of their round, then
/// FLOW_BATCH reads of the same blocks, compared. Returns the rounds done.
fn keep_flowing(mem: GuestMemoryMmap, mut q: Vring, stop: Arc<AtomicBool>) -> u64 {
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) || round < 4 {
        round += 1;
        for write in [true, false] {
            for i in 0..FLOW_BATCH {
                let hdr = FLOW_HDR + u64::from(i) * 0x20;
                let data = if write { FLOW_WRITE } else { FLOW_READ } + u64::from(i) * 4096;
                let sector = u64::from(i) * 8;
                let typ = if write { T_OUT } else { T_IN };
                write_header(&mem, hdr, hdr + 0x10, typ, sector);
                if write {
                    mem.write_slice(&pattern(round, sector * 512, 4096), GuestAddress(data))
                        .expect("data");
                } else {
                    mem.write_slice(&[UNTOUCHED; 4096], GuestAddress(data))
                        .expect("data");
                }
                let d = 3 * i;
                let w = if write { 0 } else { F_WRITE };
                q.desc(&mem, d, hdr, 16, F_NEXT, d + 1);
                q.desc(&mem, d + 1, data, 4096, F_NEXT | w, d + 2);
                q.desc(&mem, d + 2, hdr + 0x10, 1, F_WRITE, 0);
                q.push(&mem, d);
            }
            let used = q.used(&mem, FLOW_BATCH);
            for (id, len) in used {
                let i = (id / 3) as u16;
                let want_len = if write { 1 } else { 4097 };
                assert_eq!(len, want_len, "round {round} request {i} (write: {write})");
                let status: u8 = mem
                    .read_obj(GuestAddress(FLOW_HDR + u64::from(i) * 0x20 + 0x10))
                    .expect("status");
                assert_eq!(status, S_OK, "round {round} request {i} (write: {write})");
            }
        }
        let mut back = vec![0u8; 4096];
        for i in 0..u64::from(FLOW_BATCH) {
            mem.read_slice(&mut back, GuestAddress(FLOW_READ + i * 4096))
                .expect("read back");
            assert!(
                back == pattern(round, i * 8 * 512, 4096),
                "round {round}: block {i} read back other data"
            );
        }
    }
    round
}

/// The probe on queue 1: one request with its data in region B; (used length, status).
fn probe(mem: &GuestMemoryMmap, q: &mut Vring, typ: u32) -> (u32, u8) {
    write_header(mem, PROBE_HDR, PROBE_HDR + 0x10, typ, PROBE_SECTOR);
    let w = if typ == T_IN { F_WRITE } else { 0 };
    q.desc(mem, 0, PROBE_HDR, 16, F_NEXT, 1);
    q.desc(mem, 1, PROBE_DATA, 4096, F_NEXT | w, 2);
    q.desc(mem, 2, PROBE_HDR + 0x10, 1, F_WRITE, 0);
    q.push(mem, 0);
    let (id, len) = q.used(mem, 1)[0];
    assert_eq!(id, 0);
    let status = mem
        .read_obj(GuestAddress(PROBE_HDR + 0x10))
        .expect("status");
    (len, status)
}

/// Writes `tag`'s pattern through region B and reads it back into region B (cleared first):
/// both must succeed, and the disk must hold the pattern.
fn probe_served(disk: &Disk, mem: &GuestMemoryMmap, q: &mut Vring, tag: u64, when: &str) {
    let data = pattern(tag, PROBE_SECTOR * 512, 4096);
    mem.write_slice(&data, GuestAddress(PROBE_DATA))
        .expect("data");
    assert_eq!(probe(mem, q, T_OUT), (1, S_OK), "write via region B {when}");
    assert!(
        disk.file_bytes(PROBE_SECTOR * 512, 4096) == data,
        "the disk after a write via region B {when}"
    );
    mem.write_slice(&[0u8; 4096], GuestAddress(PROBE_DATA))
        .expect("clear");
    assert_eq!(
        probe(mem, q, T_IN),
        (4097, S_OK),
        "read via region B {when}"
    );
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(PROBE_DATA))
        .expect("read back");
    assert!(back == data, "read back via region B {when}");
}

/// Requests into region B fail with IOERR and change neither the disk nor region B.
fn probe_refused(disk: &Disk, mem: &GuestMemoryMmap, q: &mut Vring, tag: u64, when: &str) {
    let on_disk = disk.file_bytes(PROBE_SECTOR * 512, 4096);
    let data = pattern(tag, PROBE_SECTOR * 512, 4096);
    mem.write_slice(&data, GuestAddress(PROBE_DATA))
        .expect("data");
    assert_eq!(
        probe(mem, q, T_OUT),
        (1, S_IOERR),
        "write via region B {when}"
    );
    assert_eq!(
        probe(mem, q, T_IN),
        (1, S_IOERR),
        "read via region B {when}"
    );
    assert!(
        disk.file_bytes(PROBE_SECTOR * 512, 4096) == on_disk,
        "the disk after a refused write via region B {when}"
    );
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(PROBE_DATA))
        .expect("region B");
    assert!(back == data, "region B after a refused read {when}");
}

#[test]
fn regions_come_and_go_while_requests_flow() {
    let long = std::env::var_os("STRATA_LONG_TESTS").is_some();
    let cycles = if long { 200 } else { 12 };
    let disk = Disk::new(DISK, "");
    let _export = disk.export(|c| c.num_queues = 2);
    let mem = guest_memory(&[(0, REGION_A), (REGION_B_GPA, REGION_B)]);
    let regions = region_infos(&mem);
    let (region_a, region_b) = (&regions[0], &regions[1]);
    let (mut fe, _): (Frontend, u64) = negotiate(&disk.socket(), u64::MAX);
    assert!(fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS") >= 2);
    // Start with region A only, added as a single region.
    fe.add_mem_region(region_a).expect("ADD_MEM_REG A");
    let flow = Vring::setup(&mut fe, &mem, 0, 0, QSIZE);
    let mut q1 = Vring::setup(&mut fe, &mem, 1, QUEUE1_BASE, QSIZE);
    probe_refused(&disk, &mem, &mut q1, 1, "before it was added");

    let stop = Arc::new(AtomicBool::new(false));
    let flowing = {
        let (mem, stop) = (mem.clone(), stop.clone());
        std::thread::spawn(move || keep_flowing(mem, flow, stop))
    };
    for cycle in 0..cycles {
        let tag = 100 + 10 * cycle;
        fe.add_mem_region(region_b).expect("ADD_MEM_REG B");
        probe_served(
            &disk,
            &mem,
            &mut q1,
            tag,
            &format!("after ADD_MEM_REG ({cycle})"),
        );
        fe.remove_mem_region(region_b).expect("REM_MEM_REG B");
        probe_refused(
            &disk,
            &mem,
            &mut q1,
            tag + 1,
            &format!("after REM_MEM_REG ({cycle})"),
        );
        fe.set_mem_table(&regions).expect("SET_MEM_TABLE A+B");
        probe_served(
            &disk,
            &mem,
            &mut q1,
            tag + 2,
            &format!("after SET_MEM_TABLE A+B ({cycle})"),
        );
        fe.set_mem_table(std::slice::from_ref(region_a))
            .expect("SET_MEM_TABLE A");
        probe_refused(
            &disk,
            &mem,
            &mut q1,
            tag + 3,
            &format!("after SET_MEM_TABLE A ({cycle})"),
        );
        assert!(!flowing.is_finished(), "queue 0 stopped in cycle {cycle}");
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = flowing.join().expect("queue 0's requests");
    eprintln!("{cycles} table change cycles during {rounds} rounds of queue 0 I/O");
}
