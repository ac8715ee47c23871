# llmq: one image with the three shipped binaries, llmq (the CLI, `llmq migrate`),
# llmq-worker and llmq-scheduler, in /usr/local/bin. Build from the repository root:
#   docker build -t llmq:dev .
# The Kubernetes manifests (deploy/kubernetes) name the binary to run in each container;
# without one the image runs the CLI (`docker run --rm llmq:dev --help`). docs/kubernetes.md.
#
# The base images are build arguments: the public ones by default; `make image` builds this
# same file with buildah against bases made from Debian 12's packages (deploy/image.sh), since
# the machine it runs on cannot pull from a registry.
ARG BUILDER=docker.io/library/rust:1.95-bookworm
ARG RUNTIME=gcr.io/distroless/cc-debian12:nonroot

# The toolchain, and cargo-chef to build the dependencies in a layer of their own.
FROM ${BUILDER} AS chef
RUN cargo install cargo-chef --version 0.1.77 --locked
WORKDIR /src

# The recipe: the workspace's manifests and Cargo.lock, without its sources, so the layer
# below is rebuilt only when the dependencies change.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# cook builds from the recipe's Cargo.lock as it is (cargo-chef has no --locked of its own).
RUN cargo chef cook --release --recipe-path recipe.json -p llmq -p llmq-worker -p llmq-scheduler
# The sources, migrations/ included: sqlx::migrate! embeds them in the binaries.
COPY . .
# The commit the binaries name in llmq_build_info (deploy/image.sh passes it).
ARG LLMQ_COMMIT=unknown
RUN LLMQ_COMMIT="$LLMQ_COMMIT" cargo build --release --locked -p llmq -p llmq-worker -p llmq-scheduler

# glibc and libgcc only (TLS is rustls with bundled roots); no shell, no package manager.
FROM ${RUNTIME}
COPY --from=builder /src/target/release/llmq /usr/local/bin/llmq
COPY --from=builder /src/target/release/llmq-worker /usr/local/bin/llmq-worker
COPY --from=builder /src/target/release/llmq-scheduler /usr/local/bin/llmq-scheduler
# The distroless nonroot user, by number so runAsNonRoot can check it.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/llmq"]
