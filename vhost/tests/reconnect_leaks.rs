//! Many frontends one after the other leak neither descriptors nor threads. (Alone in its
//! test binary, so no other test's sockets or threads are counted.)

mod common;

use common::*;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).expect(dir).count()
}

#[test]
fn reconnects_leak_nothing() {
    let disk = Disk::new(1 << 20, "");
    let export = disk.export(|c| c.num_queues = 4);
    let mut baseline = None;
    for round in 0..12 {
        let mut c = Client::connect(&disk.socket(), 4, 1 << 20).expect("connect");
        let p = c.ptr(0);
        for q in 0..4 {
            assert_eq!(read(&mut c.queues[q], 0, p, 4096), 0);
        }
        drop(c);
        // The export notices the disconnect and tears the connection down asynchronously.
        let settle = std::time::Instant::now();
        loop {
            let now = (count("/proc/self/fd"), count("/proc/self/task"));
            match baseline {
                None if round == 1 => {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    baseline = Some((count("/proc/self/fd"), count("/proc/self/task")));
                    break;
                }
                Some(b) if now == b => break,
                Some(b) if settle.elapsed() > std::time::Duration::from_secs(5) => {
                    panic!("round {round}: (fds, threads) {now:?}, after round 1 {b:?}")
                }
                _ if round == 0 => break,
                _ => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }
    export.stop();
    export.join().expect("join");
}
