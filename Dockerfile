# Grid-X local lab images (see test.sh and docker-compose.yml), for one Debian
# suite at a time: test.sh builds them FROM that suite's base image and tags
# them per suite (gridx-lab-node:bookworm, gridx-lab-node:trixie,
# gridx-lab-node:forky).
#
#   node     a worker: its own dockerd, sshd and WireGuard (wireguard-go when
#            the kernel has no module). No Python: join bundles must work
#            without it.
#   hub      node + python3, runs the checkout's gridx.py mounted read-only
#            at /opt/gridx through /usr/local/bin/gridx (lab/gridx: it
#            imports gridx.py, bytecode cached, as an installed gridx does).
#   job-python  the lab's stand-in for python:3.11, built only when
#            `docker pull python:3.11` fails; always FROM the bookworm base,
#            whose python3 is 3.11 (trixie's is 3.13), whatever suite the
#            nodes run: the job image is shared by every lab.
#   job-jupyter  gridx-lab-jupyter:latest, the image `gridx jobs jupyter`
#            runs in the lab (Debian's Jupyter Notebook), shared the same way.
#
# BASE_IMAGE is debian:SUITE-slim where it can be pulled; test.sh builds
# gridx-lab-base:SUITE with debootstrap where it cannot.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS node
LABEL io.gridx.lab=1
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Debian 13 (trixie) and later ship the `docker` command in docker-cli, which
# docker.io only recommends; Debian 12 (bookworm) has no such package and its
# docker.io holds the command itself. openssh-client (the hub's ssh) is named:
# Debian testing's (forky's) openssh-server no longer brings it.
RUN apt-get update \
 && cli='' \
 && if apt-cache show docker-cli >/dev/null 2>&1; then cli=docker-cli; fi \
 && apt-get install -y --no-install-recommends \
        docker.io $cli wireguard-tools wireguard-go iproute2 iptables \
        openssh-server openssh-client procps sudo iputils-ping ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && docker --version && dockerd --version
# - host keys are made at start (lab/entrypoint.sh), unique per container;
# - the inner engine pulls a swarm task's image as a volunteer's engine does
#   (the entrypoint makes pulls from Docker Hub, out of the lab's reach, fail
#   at once instead);
# - /etc/init.d/docker raises `ulimit -n 1048576` (and -u/-p unlimited) under
#   `set -e`: a container without CAP_SYS_RESOURCE cannot raise a hard limit,
#   so those lines may fail softly instead of stopping dockerd's start.
RUN rm -f /etc/ssh/ssh_host_* \
 && mkdir -p /run/sshd /etc/wireguard \
 && chmod 0700 /etc/wireguard \
 && sed -i -E 's#^([[:space:]]*ulimit [^|]*)$#\1 2>/dev/null || true#' /etc/init.d/docker \
 && grep -q 'ulimit -n 1048576 2>/dev/null || true' /etc/init.d/docker
# The build context is lab/ (test.sh and docker-compose.yml pass it).
COPY entrypoint.sh /usr/local/sbin/gridx-lab-entrypoint
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/sbin/gridx-lab-entrypoint"]

# The hub also runs the image registry (gridx hub init: Debian's
# docker-registry, with TLS from a CA made by openssl; gridx image ls/rm
# speak to its API through curl).
FROM node AS hub
LABEL io.gridx.lab=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 docker-registry openssl curl \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
COPY gridx /usr/local/bin/gridx

FROM ${BASE_IMAGE} AS job-python
LABEL io.gridx.lab=1
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && ln -s python3 /usr/bin/python
CMD ["python3"]

# Jupyter where quay.io cannot be reached: `gridx jobs jupyter --image
# gridx-lab-jupyter:latest` (Debian's Jupyter Notebook 6).
FROM ${BASE_IMAGE} AS job-jupyter
LABEL io.gridx.lab=1
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends jupyter-notebook \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
WORKDIR /root
CMD ["jupyter", "notebook", "--ip=0.0.0.0", "--no-browser", "--allow-root"]
