//! shadowcache-bench: benchmarks, trace replay and the local demo.
//!
//! # Layout
//!
//! - `cache_bench.rs`: `cache` (hit and miss costs in process and over gRPC, index overhead)
//!   and `cache --trace` (a real address trace replayed through one node).
//! - `cluster_bench.rs`: `cluster`, a boot storm on a cluster of real node processes: owner
//!   egress with peer fetch, caching alone, and no cache.
//! - `nbd_bench.rs`: `nbd`, fio's nbd engine against qemu-nbd, nbdkit and shadowcache's NBD
//!   frontend (RAM hits, SSD hits, cold) on the same bytes.
//! - `policy_bench.rs`: `policy`, a trace replayed page by page through the node's RAM pools
//!   beside `policy_ref.rs` (plain LRU and ARC, the ARC paper's rules), with sweeps plotted by
//!   `plot.rs` and a RAM + SSD replay by tier.
//! - `faults.rs`: `faults`, the seeded simulation of the cluster for a budget of seeds, with
//!   every guard in place and with each removed (built with the `faults` feature).
//! - `campaign/`: the real-process fault campaign of `faults` (node processes killed,
//!   stopped, cut off, their SSD files corrupted, their disks filled, their origins failing).
//! - `storm/`: `bootstorm` and `demo` (the main job): a VDI boot storm on a cluster of node
//!   processes (the launcher, the workload cut from a real trace, the NBD replay engine,
//!   reports and plots), in four modes side by side.
//! - `trace/`: block trace readers, one module per format family (MSR, SYSTOR'17, Alibaba,
//!   Tencent, SPC in `csv.rs`; `blkparse.rs`; `fio.rs`; `vscsi.rs`; `.lis` and LIRS in `lis.rs`),
//!   streaming with bounded memory; `synthetic.rs`: computed disk content for traces that
//!   carry addresses only.
//! - `alloc.rs`: a counting allocator for memory-overhead figures.

pub mod alloc;
pub mod cache_bench;
pub mod campaign;
pub mod cluster_bench;
pub mod families;
#[cfg(feature = "faults")]
pub mod faults;
pub mod nbd_bench;
pub mod netfilter;
pub mod plot;
pub mod policy_bench;
pub mod policy_ref;
pub mod storm;
pub mod synthetic;
pub mod trace;
