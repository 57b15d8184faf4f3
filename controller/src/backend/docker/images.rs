//! `pgbalancer images build`: the PostgreSQL and balancer images from `images/*/Dockerfile`.
//!
//! The Dockerfiles are ordinary (`FROM debian:<suite>-slim`, apt-get install). Where that base
//! cannot be pulled, the Debian root is made with debootstrap (packages included), cached as a
//! tarball, and imported as `pgbalancer/debian-base:<suite>`, which the builds then use as
//! `BASE_IMAGE`; their install step finds the packages already there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::query_parameters::{BuildImageOptions, CreateImageOptions, RemoveImageOptions};
use bollard::Docker;
use futures::StreamExt;

use super::DockerError;
use crate::plan::{default_balancer_image, default_postgres_image};

const POSTGRES_DOCKERFILE: &str = include_str!("../../../../images/postgres/Dockerfile");
const POSTGRES_ENTRYPOINT: &str = include_str!("../../../../images/postgres/entrypoint.sh");
const POSTGRES_READY: &str = include_str!("../../../../images/postgres/ready.sh");
const POSTGRES_LIVE: &str = include_str!("../../../../images/postgres/live.sh");
const BALANCER_DOCKERFILE: &str = include_str!("../../../../images/balancer/Dockerfile");

/// Debian suite that ships PostgreSQL `version`.
pub fn suite_for(version: u32) -> Option<&'static str> {
    match version {
        15 => Some("bookworm"),
        17 => Some("trixie"),
        _ => None,
    }
}

/// Extra words for the "image missing" message.
pub fn hint_for(image: &str) -> String {
    match image.rsplit_once(':') {
        Some((repo, tag)) if repo == crate::plan::POSTGRES_IMAGE_REPO && tag != "17" => {
            format!(" --postgres-version {tag}")
        }
        _ => String::new(),
    }
}

fn packages(suite: &str) -> &'static str {
    match suite {
        "bookworm" => "postgresql-15",
        _ => "postgresql-17,pgpool2",
    }
}

/// Where rootfs tarballs are cached.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGBALANCER_CACHE_DIR") {
        return dir.into();
    }
    match std::env::var_os("HOME") {
        Some(home) if !is_root() => Path::new(&home).join(".cache/pgbalancer"),
        _ => PathBuf::from("/var/cache/pgbalancer"),
    }
}

fn is_root() -> bool {
    std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || Path::new("/root").read_dir().is_ok()
}

/// Builds the images for the PostgreSQL `versions` and the balancer, reporting progress.
pub async fn build(
    docker: &Docker,
    versions: &[u32],
    report: &mut dyn FnMut(&str),
) -> Result<(), DockerError> {
    let mut suites: Vec<&str> = versions.iter().filter_map(|v| suite_for(*v)).collect();
    suites.push("trixie");
    suites.sort_unstable();
    suites.dedup();
    for suite in &suites {
        ensure_base(docker, suite, report).await?;
    }
    for &version in versions {
        let suite = suite_for(version).ok_or_else(|| {
            DockerError::Conflict(format!("no image recipe for PostgreSQL {version}"))
        })?;
        let tag = default_postgres_image(version);
        report(&format!("building {tag}"));
        build_one(
            docker,
            &tag,
            &[
                ("Dockerfile", POSTGRES_DOCKERFILE.as_bytes(), 0o644),
                ("entrypoint.sh", POSTGRES_ENTRYPOINT.as_bytes(), 0o755),
                ("ready.sh", POSTGRES_READY.as_bytes(), 0o755),
                ("live.sh", POSTGRES_LIVE.as_bytes(), 0o755),
            ],
            &[
                ("BASE_IMAGE", base_tag(suite)),
                ("PG_MAJOR", version.to_string()),
            ],
        )
        .await?;
    }
    let tag = default_balancer_image();
    report(&format!("building {tag}"));
    let agent = sibling_binary("pgbalancer-agent")?;
    let bctl = sibling_binary("bctl")?;
    // The local controller container runs this very binary from the balancer image.
    let pgbalancer = sibling_binary("pgbalancer")?;
    build_one(
        docker,
        &tag,
        &[
            ("Dockerfile", BALANCER_DOCKERFILE.as_bytes(), 0o644),
            ("pgbalancer-agent", &agent, 0o755),
            ("bctl", &bctl, 0o755),
            ("pgbalancer", &pgbalancer, 0o755),
        ],
        &[("BASE_IMAGE", base_tag("trixie"))],
    )
    .await?;
    report("images ready");
    Ok(())
}

/// A binary installed next to the running `pgbalancer` (same build), read for an image.
fn sibling_binary(name: &str) -> Result<Vec<u8>, DockerError> {
    let path = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .ok_or_else(|| DockerError::Conflict(format!("cannot locate {name}")))?;
    std::fs::read(&path).map_err(|e| {
        DockerError::Conflict(format!(
            "{} is needed for the balancer image ({e}); build it with `cargo build --bins`",
            path.display()
        ))
    })
}

fn base_tag(suite: &str) -> String {
    format!("pgbalancer/debian-base:{suite}")
}

async fn ensure_base(
    docker: &Docker,
    suite: &str,
    report: &mut dyn FnMut(&str),
) -> Result<(), DockerError> {
    let tag = base_tag(suite);
    if docker.inspect_image(&tag).await.is_ok() {
        report(&format!("{tag} present"));
        return Ok(());
    }
    let tarball = cache_dir().join(format!("rootfs-{suite}.tar"));
    if !tarball.exists() {
        report(&format!(
            "creating the Debian {suite} root with debootstrap (about a minute)"
        ));
        debootstrap(suite, &tarball).await?;
    }
    report(&format!("importing {tag} from {}", tarball.display()));
    let file = tokio::fs::File::open(&tarball)
        .await
        .map_err(|e| DockerError::Conflict(format!("cannot read {}: {e}", tarball.display())))?;
    let chunks = futures::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((bytes::Bytes::from(buf), file))
            }
        }
    });
    let (repo, tag_part) = tag.rsplit_once(':').unwrap_or((&tag, "latest"));
    let mut stream = docker.create_image(
        Some(CreateImageOptions {
            from_src: Some("-".into()),
            repo: Some(repo.into()),
            tag: Some(tag_part.into()),
            changes: vec![format!("ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin")],
            ..Default::default()
        }),
        Some(bollard::body_stream(chunks)),
        None,
    );
    while let Some(item) = stream.next().await {
        item.map_err(DockerError::api(format!("import {tag}")))?;
    }
    Ok(())
}

async fn debootstrap(suite: &str, tarball: &Path) -> Result<(), DockerError> {
    let fail = |what: String| DockerError::Conflict(what);
    let dir = tarball.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let root = dir.join(format!("{suite}.rootfs"));
    // Leftovers of an interrupted run, usually absent; debootstrap reports a root it cannot use.
    let _ = tokio::fs::remove_dir_all(&root).await;
    let mirror = std::env::var("PGBALANCER_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let status = tokio::process::Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={}", packages(suite)), suite])
        .arg(&root)
        .arg(&mirror)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .map_err(|e| fail(format!("cannot run debootstrap ({e}); install it with `apt-get install debootstrap` (needs root)")))?;
    if !status.success() {
        return Err(fail(format!("debootstrap {suite} failed ({status})")));
    }
    // Only makes the image smaller: the downloaded packages are not needed in it.
    let _ = tokio::fs::remove_dir_all(root.join("var/cache/apt/archives")).await;
    let partial = tarball.with_extension("tar.partial");
    let status = tokio::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&partial)
        .arg(".")
        .status()
        .await
        .map_err(|e| fail(format!("cannot run tar: {e}")))?;
    if !status.success() {
        return Err(fail(format!("tar of the {suite} root failed ({status})")));
    }
    tokio::fs::rename(&partial, tarball)
        .await
        .map_err(|e| fail(format!("cannot store {}: {e}", tarball.display())))?;
    // The tarball is stored: a root left behind only takes disk space, and the next run
    // removes it.
    if let Err(e) = tokio::fs::remove_dir_all(&root).await {
        tracing::warn!(root = %root.display(), error = %e, "debootstrap root not removed");
    }
    Ok(())
}

/// The files of an image build as a tar; fails only on a path tar cannot hold.
fn build_context(files: &[(&str, &[u8], u32)]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, contents, mode) in files {
        let mut header = tar::Header::new_gnu();
        header.set_mode(*mode);
        header.set_size(contents.len() as u64);
        builder.append_data(&mut header, name, *contents)?;
    }
    builder.into_inner()
}

async fn build_one(
    docker: &Docker,
    tag: &str,
    files: &[(&str, &[u8], u32)],
    args: &[(&str, String)],
) -> Result<(), DockerError> {
    let context = build_context(files)
        .map_err(|e| DockerError::Conflict(format!("build context of {tag}: {e}")))?;
    let replaced = docker.inspect_image(tag).await.ok().and_then(|i| i.id);
    let options = BuildImageOptions {
        t: Some(tag.to_owned()),
        rm: true,
        forcerm: true,
        buildargs: Some(
            args.iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        ),
        ..Default::default()
    };
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(context.into())));
    let mut last = String::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(900), stream.next())
        .await
        .map_err(|_| DockerError::Conflict(format!("building {tag} timed out")))?
    {
        let info = item.map_err(DockerError::api(format!("build {tag}")))?;
        if let Some(line) = info.stream {
            last = line;
        }
        if let Some(detail) = info.error_detail.and_then(|d| d.message) {
            return Err(DockerError::Conflict(format!(
                "building {tag}: {detail} (last output: {})",
                last.trim()
            )));
        }
    }
    // A rebuild leaves the image it replaced untagged; drop it unless a container still
    // runs it (the engine refuses then, and that is fine).
    let current = docker.inspect_image(tag).await.ok().and_then(|i| i.id);
    if let Some(old) = replaced.filter(|old| Some(old) != current.as_ref()) {
        let _ = docker
            .remove_image(&old, None::<RemoveImageOptions>, None)
            .await;
    }
    Ok(())
}
