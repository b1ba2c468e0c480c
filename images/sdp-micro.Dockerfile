# A micro agent: Debian 12 packages unpacked into a root filesystem (git, setpriv, tar, sh,
# coreutils, CA bundle: images/micro-packages.txt), the static `sdp` binary, and the user
# `sdp-run` for `run_as`. Root, to switch users and drive the engine through its socket.
# Built by scripts/images.sh, offline.
FROM scratch
ADD rootfs.tar /
COPY sdp /usr/local/bin/sdp
ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
ENTRYPOINT ["/usr/local/bin/sdp"]
CMD ["agent", "--role", "micro"]
