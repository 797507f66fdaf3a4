# previewd's image: the two static binaries (static-pie, no libc needed) on an empty root, so it
# builds on any Docker engine without pulling an image. Build the binaries first, then the image
# from the repository root:
#   cargo build --release --bins && docker build -t previewd:dev .
# For the smaller agent previewd injects into every container:
#   cargo build --profile agent --bin previewd-agent
#   docker build --build-arg AGENT_BIN=target/x86_64-unknown-linux-gnu/agent/previewd-agent -t previewd:dev .
# In a cluster previewd needs nothing else: the API server's address comes from the environment,
# its CA certificate and token from the service account's files. Run outside a cluster
# (the embedded store), it needs a directory for --state-dir that UID 65532 owns.
FROM scratch
ARG PREVIEWD_BIN=target/x86_64-unknown-linux-gnu/release/previewd
ARG AGENT_BIN=target/x86_64-unknown-linux-gnu/release/previewd-agent
# previewd injects the previewd-agent that sits beside its own executable.
COPY ${PREVIEWD_BIN} /usr/local/bin/previewd
COPY ${AGENT_BIN} /usr/local/bin/previewd-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/previewd"]
