//! Letting a bridge the bench made carry its frames on a host whose iptables would drop them.
//!
//! Docker loads br_netfilter and turns its global switch on
//! (`net.bridge.bridge-nf-call-iptables = 1`), so frames between ports of any bridge go
//! through iptables' FORWARD chain, whose policy Docker sets to DROP; both stay after Docker
//! stops. A bridge's own `nf_call_iptables 0` does not override the global switch (the kernel
//! calls iptables when either is on). So where the switch is on, a bridge of namespaces the
//! bench built (the fault campaign's partitions, `bootstorm --netns`) gets an ACCEPT rule first
//! in FORWARD, marked with a comment naming it, and deleted with the bridge.

use crate::campaign::sh;

/// The comment that marks the rules this module adds: `shadowcache-bench BRIDGE`.
pub const COMMENT_PREFIX: &str = "shadowcache-bench ";

/// Whether frames bridged on this host pass through iptables.
pub fn bridged_frames_meet_iptables() -> bool {
    std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .is_ok_and(|v| v.trim() == "1")
}

/// The FORWARD rule (without `-I`/`-D`) that accepts frames bridged within `bridge`.
pub fn accept_rule(bridge: &str) -> Vec<String> {
    let comment = format!("{COMMENT_PREFIX}{bridge}");
    [
        "-i",
        bridge,
        "-o",
        bridge,
        "-m",
        "comment",
        "--comment",
        &comment,
        "-j",
        "ACCEPT",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect()
}

/// Where bridged frames meet iptables, inserts [`accept_rule`] for `bridge` first in FORWARD
/// and returns it (to give to [`delete`]); `None` where no rule is needed.
pub fn let_through(bridge: &str) -> anyhow::Result<Option<Vec<String>>> {
    if !bridged_frames_meet_iptables() {
        return Ok(None);
    }
    let rule = accept_rule(bridge);
    let mut args = vec!["-I", "FORWARD", "1"];
    args.extend(rule.iter().map(String::as_str));
    sh("iptables", &args).map_err(|e| {
        anyhow::anyhow!(
            "bridged frames pass through iptables here (br_netfilter, e.g. from Docker), and \
             iptables could not let bridge {bridge} through: {e:#}"
        )
    })?;
    Ok(Some(rule))
}

/// Deletes a rule [`let_through`] inserted (an error is ignored: it may be gone already).
pub fn delete(rule: &[String]) {
    let mut args = vec!["-D", "FORWARD"];
    args.extend(rule.iter().map(String::as_str));
    let _ = sh("iptables", &args);
}

/// The bridges named in this module's FORWARD rules now.
pub fn bridges_with_rules() -> Vec<String> {
    let Ok(out) = std::process::Command::new("iptables")
        .args(["-S", "FORWARD"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(COMMENT_PREFIX).nth(1))
        .filter_map(|rest| rest.split(['"', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_names_its_bridge_in_its_comment() {
        let r = accept_rule("scf12br");
        assert_eq!(r[..4], ["-i", "scf12br", "-o", "scf12br"]);
        assert!(r.contains(&"shadowcache-bench scf12br".to_string()));
        assert_eq!(r.last().map(String::as_str), Some("ACCEPT"));
    }
}
