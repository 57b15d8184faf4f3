//! Names of the project's images, shared by the planner and `pgbalancer images build`.

/// Repository of the PostgreSQL image; the tag is the major version.
pub const POSTGRES_IMAGE_REPO: &str = "pgbalancer/postgres";
/// Repository of the balancer image; the tag is the project version.
pub const BALANCER_IMAGE_REPO: &str = "pgbalancer/balancer";

/// The project's PostgreSQL image for a major version.
pub fn default_postgres_image(version: u32) -> String {
    format!("{POSTGRES_IMAGE_REPO}:{version}")
}

/// The project's balancer image for this release.
pub fn default_balancer_image() -> String {
    format!("{BALANCER_IMAGE_REPO}:{}", env!("CARGO_PKG_VERSION"))
}
