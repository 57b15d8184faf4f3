# The operator image: the static pgbalancer binary on an empty base, as an unprivileged user.
# Build the binary first (no Rust builder image is needed):
#   cargo build --release --target x86_64-unknown-linux-musl --bin pgbalancer
#   docker build -t pgbalancer/operator:0.1.0 .
FROM scratch
COPY target/x86_64-unknown-linux-musl/release/pgbalancer /pgbalancer
USER 65534:65534
EXPOSE 8080
ENTRYPOINT ["/pgbalancer"]
CMD ["operator"]
