//! The host's CPUs, RAM and GPUs, handed out first-in-first-out: the oldest waiting request
//! is served first and blocks those behind it (no overtaking, so big containers do not
//! starve). A request that could never fit this host is refused at once.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::Notify;

/// What the host has.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    pub vcpus: i64,
    pub ram: i64,
    /// GPU ids, e.g. from `CUDA_VISIBLE_DEVICES`.
    pub gpus: Vec<String>,
    /// `cuda`, `rocm`, or empty when there are no GPUs.
    pub gpu_stack: String,
}

impl Capacity {
    /// This host: CPU count, total memory from `/proc/meminfo`, GPUs from
    /// `CUDA_VISIBLE_DEVICES` (cuda) or else `AMD_VISIBLE_DEVICES` (rocm).
    pub fn of_host() -> Capacity {
        let vcpus = arvados::host::cpu_count();
        let ram = arvados::host::total_memory();
        let list = |k: &str| -> Vec<String> {
            std::env::var(k)
                .ok()
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        let (gpus, gpu_stack) = match (list("CUDA_VISIBLE_DEVICES"), list("AMD_VISIBLE_DEVICES")) {
            (c, _) if !c.is_empty() => (c, "cuda".to_string()),
            (_, a) if !a.is_empty() => (a, "rocm".to_string()),
            _ => (Vec::new(), String::new()),
        };
        Capacity {
            vcpus,
            ram,
            gpus,
            gpu_stack,
        }
    }
}

/// What one container asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub vcpus: i64,
    pub ram: i64,
    pub gpu_stack: String,
    pub gpus: i64,
}

/// Resources handed to a container; give them back with [`ResourceManager::release`].
#[derive(Debug)]
pub struct Grant {
    vcpus: i64,
    ram: i64,
    pub gpus: Vec<String>,
}

/// A place in the queue.
#[derive(Debug)]
pub struct Ticket(u64);

#[derive(Debug)]
struct State {
    free_vcpus: i64,
    free_ram: i64,
    free_gpus: Vec<String>,
    next: u64,
    waiting: VecDeque<(u64, Request)>,
    granted: Vec<(u64, Grant)>,
}

/// The FIFO allocator; cheap to clone.
#[derive(Clone)]
pub struct ResourceManager {
    cap: Arc<Capacity>,
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl ResourceManager {
    pub fn new(cap: Capacity) -> ResourceManager {
        ResourceManager {
            state: Arc::new(Mutex::new(State {
                free_vcpus: cap.vcpus,
                free_ram: cap.ram,
                free_gpus: cap.gpus.clone(),
                next: 0,
                waiting: VecDeque::new(),
                granted: Vec::new(),
            })),
            cap: Arc::new(cap),
            changed: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Whether `req` could ever be satisfied on this host.
    pub fn satisfiable(&self, req: &Request) -> bool {
        let c = &self.cap;
        req.vcpus >= 1
            && req.vcpus <= c.vcpus
            && req.ram >= 1
            && req.ram <= c.ram
            && req.gpus <= c.gpus.len() as i64
            && (req.gpus <= 0 || req.gpu_stack == c.gpu_stack)
    }

    /// Join the queue; `None` if the request can never be satisfied.
    pub fn enqueue(&self, req: Request) -> Option<Ticket> {
        if !self.satisfiable(&req) {
            return None;
        }
        let mut st = self.lock();
        let id = st.next;
        st.next += 1;
        st.waiting.push_back((id, req));
        Self::pump(&mut st);
        drop(st);
        self.changed.notify_waiters();
        Some(Ticket(id))
    }

    /// Grant from the head of the queue while the head fits.
    fn pump(st: &mut State) {
        while let Some((id, req)) = st.waiting.front().cloned() {
            let gpus = req.gpus.max(0) as usize;
            if req.vcpus > st.free_vcpus || req.ram > st.free_ram || gpus > st.free_gpus.len() {
                return;
            }
            st.waiting.pop_front();
            st.free_vcpus -= req.vcpus;
            st.free_ram -= req.ram;
            // GPUs from the end of the available list.
            let at = st.free_gpus.len() - gpus;
            let g = st.free_gpus.split_off(at);
            st.granted.push((
                id,
                Grant {
                    vcpus: req.vcpus,
                    ram: req.ram,
                    gpus: g,
                },
            ));
        }
    }

    /// Wait until the ticket is granted.
    pub async fn wait(&self, t: &Ticket) -> Grant {
        loop {
            let notified = self.changed.notified();
            {
                let mut st = self.lock();
                if let Some(pos) = st.granted.iter().position(|(id, _)| *id == t.0) {
                    return st.granted.swap_remove(pos).1;
                }
            }
            notified.await;
        }
    }

    /// Leave the queue (or give back a grant that was not collected).
    pub fn cancel(&self, t: &Ticket) {
        let mut st = self.lock();
        st.waiting.retain(|(id, _)| *id != t.0);
        if let Some(pos) = st.granted.iter().position(|(id, _)| *id == t.0) {
            let (_, g) = st.granted.swap_remove(pos);
            Self::give_back(&mut st, g);
        }
        Self::pump(&mut st);
        drop(st);
        self.changed.notify_waiters();
    }

    fn give_back(st: &mut State, g: Grant) {
        st.free_vcpus += g.vcpus;
        st.free_ram += g.ram;
        st.free_gpus.extend(g.gpus);
    }

    /// Give resources back.
    pub fn release(&self, g: Grant) {
        let mut st = self.lock();
        Self::give_back(&mut st, g);
        Self::pump(&mut st);
        drop(st);
        self.changed.notify_waiters();
    }

    /// Free VCPUs right now.
    pub fn free_vcpus(&self) -> i64 {
        self.lock().free_vcpus
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cap() -> Capacity {
        Capacity {
            vcpus: 4,
            ram: 8 << 30,
            gpus: vec!["0".into(), "1".into()],
            gpu_stack: "cuda".into(),
        }
    }

    fn req(vcpus: i64, gib: i64, gpus: i64) -> Request {
        Request {
            vcpus,
            ram: gib << 30,
            gpu_stack: if gpus > 0 {
                "cuda".into()
            } else {
                String::new()
            },
            gpus,
        }
    }

    #[test]
    fn impossible_requests_are_refused() {
        let m = ResourceManager::new(cap());
        assert!(m.enqueue(req(0, 1, 0)).is_none(), "no VCPU");
        assert!(
            m.enqueue(req(5, 1, 0)).is_none(),
            "more VCPUs than the host"
        );
        assert!(m.enqueue(req(1, 9, 0)).is_none(), "more RAM than the host");
        assert!(m.enqueue(req(1, 1, 3)).is_none(), "more GPUs than the host");
        let mut rocm = req(1, 1, 1);
        rocm.gpu_stack = "rocm".into();
        assert!(m.enqueue(rocm).is_none(), "other GPU stack");
        assert!(m.enqueue(req(4, 8, 2)).is_some());
    }

    #[tokio::test]
    async fn first_in_first_out_with_head_of_line_blocking() {
        let m = ResourceManager::new(cap());
        let a = m.enqueue(req(3, 1, 0)).unwrap();
        let ga = m.wait(&a).await;
        let b = m.enqueue(req(2, 1, 0)).unwrap(); // must wait for a
        let c = m.enqueue(req(1, 1, 0)).unwrap(); // would fit, but waits behind b
        assert!(
            tokio::time::timeout(Duration::from_millis(50), m.wait(&c))
                .await
                .is_err()
        );
        m.release(ga);
        let gb = m.wait(&b).await;
        let gc = m.wait(&c).await;
        assert_eq!(m.free_vcpus(), 1);
        m.release(gb);
        m.release(gc);
        assert_eq!(m.free_vcpus(), 4);
    }

    #[tokio::test]
    async fn gpus_are_assigned_from_the_end_and_cancel_frees_the_queue() {
        let m = ResourceManager::new(cap());
        let a = m.enqueue(req(1, 1, 1)).unwrap();
        let ga = m.wait(&a).await;
        assert_eq!(ga.gpus, vec!["1".to_string()]);
        let big = m.enqueue(req(4, 1, 0)).unwrap();
        let small = m.enqueue(req(1, 1, 1)).unwrap();
        m.cancel(&big);
        let gs = m.wait(&small).await;
        assert_eq!(gs.gpus, vec!["0".to_string()]);
    }
}
