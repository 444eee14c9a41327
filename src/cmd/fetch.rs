//! `lfm2d fetch-model`: downloads an official checkpoint into the Hugging Face hub cache.
//!
//! The transfer itself is hf-hub's (sync API over ureq): the hub's URL layout, `HF_ENDPOINT`,
//! redirects to the storage servers, the cache layout (`blobs/`, `snapshots/<commit>/`,
//! `refs/<revision>`), and resumption: a file is written to `blobs/<etag>.part` and an
//! interrupted transfer continues from its length with an HTTP `Range` request, both within a
//! run (`--retries`) and in the next run. On top of that, this command lists the repository
//! through the hub API, skips what the cache already holds, and checks every file it downloads
//! against the hub's checksum (sha256 of LFS files, git blob sha1 of the others); a file that
//! does not match is deleted and named in the error.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde::Deserialize;
use sha1::Digest;

use crate::model_cache::{self, DEFAULT_REPO};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hugging Face repository of the checkpoint (LiquidAI/LFM2-Audio-1.5B also works).
    #[arg(long, default_value = DEFAULT_REPO)]
    pub repo: String,
    /// Branch, tag or commit to fetch.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Hub cache directory (default: HF_HUB_CACHE, else $HF_HOME/hub, else
    /// ~/.cache/huggingface/hub).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// How often a transfer that broke off is resumed within this run before giving up (a later
    /// run resumes it too).
    #[arg(long, default_value_t = 5)]
    pub retries: usize,
}

/// The hub's description of a repository at a revision (`/api/models/{repo}/revision/{rev}`
/// with `blobs=true`).
#[derive(Deserialize, Debug)]
struct RepoListing {
    /// The commit the revision resolves to.
    sha: String,
    siblings: Vec<RemoteFile>,
}

#[derive(Deserialize, Debug)]
struct RemoteFile {
    rfilename: String,
    size: Option<u64>,
    /// The git blob id (sha1 of `blob <len>\0<content>`); for LFS files, that of the pointer.
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<LfsInfo>,
}

#[derive(Deserialize, Debug)]
struct LfsInfo {
    sha256: String,
    size: u64,
}

impl RemoteFile {
    fn size(&self) -> Option<u64> {
        self.lfs.as_ref().map(|l| l.size).or(self.size)
    }

    /// The checksum the content must have, and the name hf-hub gives its blob (the hub's ETag).
    fn checksum(&self) -> Option<Checksum> {
        match (&self.lfs, &self.blob_id) {
            (Some(lfs), _) => Some(Checksum::Sha256(lfs.sha256.to_ascii_lowercase())),
            (None, Some(id)) => Some(Checksum::GitSha1(id.to_ascii_lowercase())),
            (None, None) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Checksum {
    Sha256(String),
    GitSha1(String),
}

impl Checksum {
    fn expected(&self) -> &str {
        match self {
            Checksum::Sha256(h) | Checksum::GitSha1(h) => h,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Checksum::Sha256(_) => "sha256",
            Checksum::GitSha1(_) => "git sha1",
        }
    }
}

/// Files of a model repository that lfm2d has no use for: the model card, images, git
/// attributes.
fn is_wanted(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let file = lower.rsplit('/').next().unwrap_or(&lower);
    let skipped_ext = [".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"];
    !(file == ".gitattributes" || skipped_ext.iter().any(|e| file.ends_with(e)))
}

/// A repository path that stays inside the snapshot directory.
fn is_safe_relative(name: &str) -> bool {
    !name.is_empty()
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// The access token, as the hub's tools find it: `HF_TOKEN`, else `$HF_HOME/token`.
fn token() -> Option<String> {
    let from_env = std::env::var("HF_TOKEN").ok();
    let from_file = || {
        let path = model_cache::hf_home()?.join("token");
        std::fs::read_to_string(path).ok()
    };
    from_env
        .or_else(from_file)
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".to_owned())
        .trim_end_matches('/')
        .to_owned()
}

/// A progress bar per file, fed by hf-hub. `init` restarts it because hf-hub calls it again,
/// followed by the length already on disk, whenever it resumes.
struct FileBar(ProgressBar);

impl FileBar {
    fn new() -> Self {
        let bar = ProgressBar::new(0);
        let style = ProgressStyle::with_template(
            "{msg:32!} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        )
        .map(|s| s.progress_chars("=> "));
        if let Ok(style) = style {
            bar.set_style(style);
        }
        Self(bar)
    }
}

impl Progress for FileBar {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.set_length(size as u64);
        self.0.set_position(0);
        self.0.set_message(filename.to_owned());
    }

    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

/// The hex digest of a file, as `checksum` asks for it, with a progress bar for large files.
fn digest_file(path: &Path, checksum: &Checksum, name: &str) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let len = file.metadata()?.len();
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template("{msg:32!} [{wide_bar}] verifying") {
        bar.set_style(style);
    }
    bar.set_message(name.to_owned());
    let mut sha256 = sha2::Sha256::new();
    let mut sha1 = sha1::Sha1::new();
    if let Checksum::GitSha1(_) = checksum {
        sha1.update(format!("blob {len}\0").as_bytes());
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        match checksum {
            Checksum::Sha256(_) => sha256.update(&buf[..n]),
            Checksum::GitSha1(_) => sha1.update(&buf[..n]),
        }
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let bytes: Vec<u8> = match checksum {
        Checksum::Sha256(_) => sha256.finalize().to_vec(),
        Checksum::GitSha1(_) => sha1.finalize().to_vec(),
    };
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Deletes a downloaded file: its snapshot link and the blob it points to.
fn discard(link: &Path) {
    if let Ok(blob) = std::fs::canonicalize(link) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(link);
}

enum Outcome {
    Present,
    Downloaded,
}

/// Brings one file into the snapshot: skips it when it is there with the right size, else
/// downloads (or resumes) it and checks its checksum.
fn fetch_file(
    repo: &ApiRepo,
    snapshot: &Path,
    blobs: &Path,
    file: &RemoteFile,
) -> anyhow::Result<Outcome> {
    let name = &file.rfilename;
    let target = snapshot.join(name);
    let size = file.size();
    if let Ok(meta) = std::fs::metadata(&target) {
        if meta.is_file() && size.is_none_or(|s| s == meta.len()) {
            return Ok(Outcome::Present);
        }
    }
    // A stale link (a dangling one, or to a file of the wrong size) would be kept by hf-hub,
    // which does not replace an existing link.
    if std::fs::symlink_metadata(&target).is_ok() {
        discard(&target);
    }
    let checksum = file.checksum();
    if let (Some(c), Some(size)) = (&checksum, size) {
        let part = blobs.join(format!("{}.part", c.expected()));
        match std::fs::metadata(&part).map(|m| m.len()) {
            // A part as long as the file, or longer, cannot be resumed (the range would be
            // empty); start over.
            Ok(len) if len >= size => {
                let _ = std::fs::remove_file(&part);
            }
            Ok(len) if len > 0 => eprintln!(
                "{name}: resuming at {} of {}",
                HumanBytes(len),
                HumanBytes(size)
            ),
            _ => {}
        }
    }

    let path = repo
        .download_with_progress(name, FileBar::new())
        .map_err(|e| {
            anyhow::anyhow!(
                "downloading {name} from {}: {e}; run the command again to resume",
                repo.url(name)
            )
        })?;
    if path != target {
        bail!(
            "{name} arrived in {} instead of {}: the repository changed while it was fetched; run the command again",
            path.display(),
            target.display()
        );
    }

    let got_size = std::fs::metadata(&path)?.len();
    if let Some(size) = size.filter(|&s| s != got_size) {
        discard(&path);
        bail!("{name}: the download has {got_size} bytes, the hub lists {size}; the file was deleted, run the command again");
    }
    if let Some(c) = &checksum {
        let got = digest_file(&path, c, name)?;
        if got != c.expected() {
            discard(&path);
            bail!(
                "checksum mismatch for {name}: {} is {got}, the hub lists {}; the damaged download was deleted, run the command again",
                c.kind(),
                c.expected()
            );
        }
    }
    Ok(Outcome::Downloaded)
}

fn list_repo(
    repo: &ApiRepo,
    name: &str,
    revision: &str,
    endpoint: &str,
) -> anyhow::Result<RepoListing> {
    let response = repo.info_request().query("blobs", "true").call();
    let response = match response {
        Ok(r) => r,
        Err(ureq::Error::Status(404, _)) => bail!(
            "{name} at revision {revision} was not found on {endpoint}: check --repo and --revision"
        ),
        Err(ureq::Error::Status(code @ (401 | 403), _)) => bail!(
            "{endpoint} refused access to {name} (HTTP {code}): for a gated or private repository, \
             accept its terms on the website and put an access token in HF_TOKEN"
        ),
        Err(ureq::Error::Status(code, _)) => {
            bail!("listing {name} on {endpoint} failed with HTTP {code}")
        }
        Err(e) => bail!(
            "cannot reach {endpoint} to list {name}: {e} (HF_ENDPOINT chooses another server, such as a mirror)"
        ),
    };
    response
        .into_json()
        .with_context(|| format!("{endpoint} answered the listing of {name} with something that is not a repository description"))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.repo.contains('/') || !is_safe_relative(&args.repo) {
        bail!("--repo must be of the form Org/Name, like {DEFAULT_REPO}");
    }
    let cache_dir = match &args.cache_dir {
        Some(dir) => dir.clone(),
        None => model_cache::hub_cache_dir()?,
    };
    std::fs::create_dir_all(&cache_dir)
        .with_context(|| format!("creating the model cache {}", cache_dir.display()))?;
    let endpoint = endpoint();
    let api = ApiBuilder::from_cache(Cache::new(cache_dir.clone()))
        .with_endpoint(endpoint.clone())
        .with_token(token())
        .with_retries(args.retries)
        .with_user_agent("lfm2d", env!("CARGO_PKG_VERSION"))
        .build()
        .context("setting up the download client")?;
    let repo = api.repo(Repo::with_revision(
        args.repo.clone(),
        RepoType::Model,
        args.revision.clone(),
    ));

    let listing = list_repo(&repo, &args.repo, &args.revision, &endpoint)?;
    if listing.sha.is_empty() || !listing.sha.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!(
            "{endpoint} gave {:?} as the commit of {}: not a commit id",
            listing.sha,
            args.repo
        );
    }
    if let Some(bad) = listing
        .siblings
        .iter()
        .find(|f| !is_safe_relative(&f.rfilename))
    {
        bail!(
            "{endpoint} lists a file outside the repository: {:?}",
            bad.rfilename
        );
    }
    for required in ["config.json", "model.safetensors", "tokenizer.json"] {
        if !listing.siblings.iter().any(|f| f.rfilename == required) {
            bail!(
                "{} at {} has no {required}: it is not an LFM2-Audio checkpoint in the official layout",
                args.repo,
                args.revision
            );
        }
    }
    let files: Vec<&RemoteFile> = listing
        .siblings
        .iter()
        .filter(|f| is_wanted(&f.rfilename))
        .collect();

    let folder = model_cache::repo_folder(&cache_dir, &args.repo);
    let snapshot = folder.join("snapshots").join(&listing.sha);
    let blobs = folder.join("blobs");
    let total: u64 = files.iter().filter_map(|f| f.size()).sum();
    eprintln!(
        "{} at {} (commit {}) from {endpoint}: {} files, {}",
        args.repo,
        args.revision,
        listing.sha,
        files.len(),
        HumanBytes(total)
    );
    eprintln!("into {}", cache_dir.display());

    let mut downloaded = 0usize;
    for file in &files {
        match fetch_file(&repo, &snapshot, &blobs, file)? {
            Outcome::Present => eprintln!("{}: already in the cache", file.rfilename),
            Outcome::Downloaded => {
                downloaded += 1;
                let how = file
                    .checksum()
                    .map(|c| format!(", {} verified", c.kind()))
                    .unwrap_or_default();
                eprintln!(
                    "{}: {}{how}",
                    file.rfilename,
                    HumanBytes(file.size().unwrap_or(0))
                );
            }
        }
    }
    // hf-hub records the revision with each download; record it also when nothing was needed.
    let refs = folder.join("refs").join(&args.revision);
    if let Some(parent) = refs.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&refs, &listing.sha).with_context(|| format!("writing {}", refs.display()))?;

    check_model(&snapshot)?;
    eprintln!(
        "{downloaded} of {} files downloaded; the model is ready (`lfm2d serve` finds it)",
        files.len()
    );
    println!("{}", snapshot.display());
    Ok(())
}

/// Checks that the fetched directory is a model lfm2d can load, without loading the weights:
/// the configuration, the tokenizer, and the header of every safetensors file.
fn check_model(dir: &Path) -> anyhow::Result<()> {
    let model = lfm2_audio::model::ModelDir::open(dir)?;
    lfm2_audio::config::Lfm2AudioConfig::from_file(&model.config())?;
    lfm2_audio::tokenizer::TextTokenizer::from_file(&model.tokenizer())?;
    lfm2_audio::weights::Weights::open(&model.weights())?;
    let detokenizer = model.audio_detokenizer();
    if let Some(dir) = &detokenizer {
        lfm2_audio::weights::Weights::open(&dir.join("model.safetensors"))?;
    }
    if let Some(mimi) = model.mimi() {
        lfm2_audio::weights::Weights::open(&mimi)?;
    } else if detokenizer.is_none() {
        eprintln!(
            "warning: the checkpoint has neither audio_detokenizer/ nor {}: it can write text, \
             not speak",
            lfm2_audio::model::MIMI_FILE
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_model_cards_and_images_only() {
        for name in [
            "README.md",
            ".gitattributes",
            "assets/diagram.png",
            "docs/x.JPG",
        ] {
            assert!(!is_wanted(name), "{name}");
        }
        for name in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "chat_template.jinja",
            "audio_detokenizer/model.safetensors",
            "tokenizer-e351c8d8-checkpoint125.safetensors",
        ] {
            assert!(is_wanted(name), "{name}");
        }
    }

    #[test]
    fn rejects_paths_leaving_the_snapshot() {
        for name in ["../x", "/etc/passwd", "a/../../b", "", "./a"] {
            assert!(!is_safe_relative(name), "{name}");
        }
        assert!(is_safe_relative("audio_detokenizer/config.json"));
    }

    #[test]
    fn git_blob_sha1_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "hello\n").unwrap();
        let c = Checksum::GitSha1(String::new());
        assert_eq!(
            digest_file(&path, &c, "f").unwrap(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        let c = Checksum::Sha256(String::new());
        assert_eq!(
            digest_file(&path, &c, "f").unwrap(),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
    }
}
