//! Where downloaded models live: the Hugging Face hub cache, in the layout the hub's own tools
//! use, so that a model fetched by `lfm2d fetch-model` or by Python (`huggingface-cli download`)
//! is found by both.
//!
//! ```text
//! <cache>/models--LiquidAI--LFM2.5-Audio-1.5B/
//!     refs/main                      the commit that `main` pointed to when it was fetched
//!     snapshots/<commit>/<file>      symbolic links into blobs/
//!     blobs/<sha256 or git sha1>     the files' contents
//! ```
//!
//! The cache directory is chosen as the hub does: `HF_HUB_CACHE` (or the older
//! `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use lfm2_audio::model::ModelDir;

/// The model `lfm2d fetch-model` downloads by default.
pub const DEFAULT_REPO: &str = "LiquidAI/LFM2.5-Audio-1.5B";

/// The checkpoints lfm2d runs, in the order a missing `--model` looks for them.
pub const KNOWN_REPOS: [&str; 2] = [DEFAULT_REPO, "LiquidAI/LFM2-Audio-1.5B"];

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The hub's home directory (`HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else
/// `~/.cache/huggingface`); the access token lives there.
pub fn hf_home() -> Option<PathBuf> {
    env_path("HF_HOME")
        .or_else(|| env_path("XDG_CACHE_HOME").map(|d| d.join("huggingface")))
        .or_else(|| std::env::home_dir().map(|h| h.join(".cache").join("huggingface")))
}

/// The hub cache directory, chosen from the environment as the hub's tools choose it.
pub fn hub_cache_dir() -> anyhow::Result<PathBuf> {
    env_path("HF_HUB_CACHE")
        .or_else(|| env_path("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| hf_home().map(|h| h.join("hub")))
        .context("cannot tell where the model cache is: set HF_HOME or HF_HUB_CACHE, or pass --model DIR")
}

/// `models--Org--Name`: the folder of a model repository in the cache.
pub fn repo_folder(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The snapshot directory of `repo` at `revision` (a branch or tag recorded under `refs/`, or
/// a commit), whether or not it exists yet.
pub fn snapshot_dir(cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let folder = repo_folder(cache, repo);
    let commit = match std::fs::read_to_string(folder.join("refs").join(revision)) {
        Ok(commit) => commit.trim().to_owned(),
        Err(_) => revision.to_owned(),
    };
    let valid = !commit.is_empty() && commit.chars().all(|c| c.is_ascii_alphanumeric());
    valid.then(|| folder.join("snapshots").join(commit))
}

/// What the cache holds for one repository.
enum Cached {
    /// A snapshot with every file a model needs.
    Complete(PathBuf),
    /// A snapshot that lacks a file (an interrupted fetch).
    Incomplete(PathBuf, String),
    Absent,
}

fn look_up(cache: &Path, repo: &str) -> Cached {
    // `main` first; then any other snapshot (another revision), the newest first.
    let mut candidates: Vec<PathBuf> = snapshot_dir(cache, repo, "main")
        .filter(|d| d.is_dir())
        .into_iter()
        .collect();
    if let Ok(entries) = std::fs::read_dir(repo_folder(cache, repo).join("snapshots")) {
        let mut others: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && !candidates.contains(p))
            .map(|p| {
                let modified = p
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (modified, p)
            })
            .collect();
        others.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
        candidates.extend(others.into_iter().map(|(_, p)| p));
    }
    let mut incomplete = None;
    for dir in candidates {
        match ModelDir::open(&dir) {
            Ok(_) => return Cached::Complete(dir),
            Err(e) => {
                incomplete.get_or_insert((dir, e.to_string()));
            }
        }
    }
    match incomplete {
        Some((dir, why)) => Cached::Incomplete(dir, why),
        None => Cached::Absent,
    }
}

/// The model used when no `--model` is given: the cached snapshot of LFM2.5-Audio-1.5B, else of
/// LFM2-Audio-1.5B. When there is none, the error says how to get one.
pub fn default_model_dir() -> anyhow::Result<PathBuf> {
    let cache = hub_cache_dir()?;
    find_in_cache(&cache)
}

/// [`default_model_dir`] in a given cache directory.
pub fn find_in_cache(cache: &Path) -> anyhow::Result<PathBuf> {
    let mut incomplete = None;
    for repo in KNOWN_REPOS {
        match look_up(cache, repo) {
            Cached::Complete(dir) => return Ok(dir),
            Cached::Incomplete(dir, why) => {
                incomplete.get_or_insert((repo, dir, why));
            }
            Cached::Absent => {}
        }
    }
    match incomplete {
        Some((repo, dir, why)) => anyhow::bail!(
            "the cached model {repo} in {} is incomplete ({why}): run `lfm2d fetch-model --repo {repo}` \
             again (it resumes where it stopped), or pass --model DIR",
            dir.display()
        ),
        None => anyhow::bail!(
            "no model given and none in the model cache {}: download one with `lfm2d fetch-model` \
             ({DEFAULT_REPO}, over 3 GB), or pass --model DIR (a directory in the Hugging Face \
             layout; `--model tests/fixtures/tiny-c/model` runs the bundled demo model)",
            cache.display()
        ),
    }
}

/// `--model DIR` when given, else [`default_model_dir`].
pub fn model_or_default(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    match model {
        Some(dir) => Ok(dir.to_owned()),
        None => default_model_dir(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a/model")
    }

    fn link_snapshot(cache: &Path, repo: &str, commit: &str, files: &[&str]) -> PathBuf {
        let snap = repo_folder(cache, repo).join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for f in files {
            std::os::unix::fs::symlink(fixture().join(f), snap.join(f)).unwrap();
        }
        snap
    }

    #[test]
    fn repo_folder_follows_the_hub_naming() {
        assert_eq!(
            repo_folder(Path::new("/c"), "LiquidAI/LFM2.5-Audio-1.5B"),
            Path::new("/c/models--LiquidAI--LFM2.5-Audio-1.5B")
        );
    }

    #[test]
    fn empty_cache_says_how_to_get_a_model() {
        let tmp = tempfile::tempdir().unwrap();
        let err = find_in_cache(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("lfm2d fetch-model"), "{err}");
        assert!(err.contains("--model DIR"), "{err}");
    }

    #[test]
    fn main_ref_wins_and_the_older_model_is_a_fallback() {
        let tmp = tempfile::tempdir().unwrap();
        let all = ["config.json", "model.safetensors", "tokenizer.json"];
        let old = link_snapshot(tmp.path(), "LiquidAI/LFM2-Audio-1.5B", "aaa", &all);
        assert_eq!(find_in_cache(tmp.path()).unwrap(), old);

        let new = link_snapshot(tmp.path(), DEFAULT_REPO, "bbb", &all);
        link_snapshot(tmp.path(), DEFAULT_REPO, "ccc", &all);
        let refs = repo_folder(tmp.path(), DEFAULT_REPO).join("refs");
        std::fs::create_dir_all(&refs).unwrap();
        std::fs::write(refs.join("main"), "bbb\n").unwrap();
        assert_eq!(find_in_cache(tmp.path()).unwrap(), new);
    }

    #[test]
    fn incomplete_snapshot_says_to_fetch_again() {
        let tmp = tempfile::tempdir().unwrap();
        link_snapshot(tmp.path(), DEFAULT_REPO, "abc", &["config.json"]);
        let err = find_in_cache(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("incomplete"), "{err}");
        assert!(err.contains("resumes"), "{err}");
    }
}
