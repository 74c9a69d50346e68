//! [`Worker`]: a thread kept for the saver's whole life that runs one task at a time, and the
//! [`Task`] handle of what it runs.
//!
//! A save's copy and write used to run on threads started and ended per save; with glibc's malloc a
//! new thread may take another arena, and the buffers of each save then spread over arenas that
//! never give their memory back: resident memory crept up over hundreds of saves. Two long-lived
//! threads reuse the same arenas, so memory stays flat (tested over 1,000 saves in `saver`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Result};

type Job = Box<dyn FnOnce() + Send>;

/// A long-lived thread running the tasks given to it, in order.
pub(crate) struct Worker {
    name: &'static str,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

/// A task given to a [`Worker`]: its result once done.
pub(crate) struct Task<T> {
    name: &'static str,
    result: mpsc::Receiver<T>,
    done: Option<T>,
    gone: bool,
}

impl Worker {
    /// A worker thread named `name` (also in its errors).
    pub(crate) fn new(name: &'static str) -> Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    // A task that panics loses its result (its Task reports it), not the thread.
                    let _ = catch_unwind(AssertUnwindSafe(job));
                }
            })
            .map_err(|e| anyhow!("starting the {name} thread: {e}"))?;
        Ok(Self {
            name,
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `f` on the thread after the tasks given before it.
    pub(crate) fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Task<T> {
        let (tx, result) = mpsc::channel();
        let sent = self.jobs.as_ref().is_some_and(|jobs| {
            jobs.send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .is_ok()
        });
        Task {
            name: self.name,
            result,
            done: None,
            gone: !sent,
        }
    }
}

impl Worker {
    /// Lets the thread go without waiting for what it runs (the process is about to end: a task
    /// that waits for ranks that died would hold the exit up to the collective timeout).
    pub(crate) fn abandon(&mut self) {
        drop(self.jobs.take());
        drop(self.thread.take());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl<T> Task<T> {
    /// Whether the task has ended (with a result, or by a panic); never waits.
    pub(crate) fn is_finished(&mut self) -> bool {
        if self.done.is_some() || self.gone {
            return true;
        }
        match self.result.try_recv() {
            Ok(v) => {
                self.done = Some(v);
                true
            }
            Err(mpsc::TryRecvError::Empty) => false,
            Err(mpsc::TryRecvError::Disconnected) => {
                self.gone = true;
                true
            }
        }
    }

    /// Waits until the task has ended, keeping its result for [`Task::join`].
    pub(crate) fn wait(&mut self) {
        if self.done.is_some() || self.gone {
            return;
        }
        match self.result.recv() {
            Ok(v) => self.done = Some(v),
            Err(_) => self.gone = true,
        }
    }

    /// Waits for the task's result; an error if it panicked.
    pub(crate) fn join(mut self) -> Result<T> {
        if let Some(v) = self.done.take() {
            return Ok(v);
        }
        self.result
            .recv()
            .map_err(|_| anyhow!("the {} thread panicked", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_tasks_in_order_on_one_thread_and_survives_a_panic() {
        let w = Worker::new("test-worker").unwrap();
        let a = w.run(|| std::thread::current().id());
        let b = w.run(|| -> u32 { panic!("boom") });
        let c = w.run(|| std::thread::current().id());
        let (a, c) = (a.join().unwrap(), c.join().unwrap());
        assert_eq!(a, c);
        assert_ne!(a, std::thread::current().id());
        let e = b.join().unwrap_err().to_string();
        assert!(e.contains("test-worker thread panicked"), "{e}");
        let mut d = w.run(|| 7);
        while !d.is_finished() {
            std::thread::yield_now();
        }
        assert_eq!(d.join().unwrap(), 7);
    }
}
