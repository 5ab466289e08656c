# NCCL environment for Ray nodes with NVIDIA GPUs (the GPU variant of hccl_env.sh). Source it before
# `ray start` on every node; Ray's workers inherit the raylet's environment.
#
#     CLUSTER_IFNAME=eth1 source cluster/nccl_env.sh && ray start ...

# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME: the private interface for NCCL's bootstrap sockets (and its
# TCP transport when there is no InfiniBand) and for gloo. Unset, NCCL skips docker/loopback interfaces
# and takes the first other one, which is wrong on hosts with a public NIC.
if [ -n "${CLUSTER_IFNAME:-}" ]; then
    export NCCL_SOCKET_IFNAME="$CLUSTER_IFNAME"
    export GLOO_SOCKET_IFNAME="$CLUSTER_IFNAME"
fi
# NCCL_DEBUG=WARN: NCCL prints only problems (INFO prints the chosen topology and transports: use it
# once, when checking that inter-node traffic goes over InfiniBand / RoCE rather than TCP).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a failed or hung collective aborts the process group instead of
# blocking forever, so Ray Train sees the failure and restarts from the latest checkpoint.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# PYTORCH_CUDA_ALLOC_CONF: segments grow instead of fragmenting across length-grouped batch widths.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# Deliberately not set here:
# - CUDA_VISIBLE_DEVICES: Ray sets it per worker (one GPU each).
# - NCCL_IB_HCA: NCCL finds InfiniBand adapters itself; name them only to exclude some.
