//! The engine thread's side: conversations, their histories, and the reply loop.

use std::sync::Arc;

use codec::Detokenizer;
use crossbeam_channel::Receiver;
use lfm2_audio::model::Lfm2AudioModel;

use super::Job;

pub(crate) struct Worker {
    model: Arc<Lfm2AudioModel>,
    detok: Box<dyn Detokenizer>,
}

impl Worker {
    pub(crate) fn new(model: Arc<Lfm2AudioModel>, detok: Box<dyn Detokenizer>) -> Self {
        Self { model, detok }
    }

    pub(crate) fn run(&mut self, jobs: Receiver<Job>) {
        let _ = (&self.model, &self.detok);
        while let Ok(job) = jobs.recv() {
            if let Job::Shutdown = job {
                break;
            }
            todo!("engine jobs")
        }
    }
}
