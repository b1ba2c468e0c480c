# The control plane and the gateway agent: the static `sdp` binary and nothing else but a CA
# bundle, /etc/passwd and the data folders (rootfs.tar). Built by scripts/images.sh, offline.
FROM scratch
ADD rootfs.tar /
COPY sdp /usr/local/bin/sdp
USER 10000:10000
ENTRYPOINT ["/usr/local/bin/sdp"]
CMD ["server", "--config", "/etc/sdp/server.toml"]
