//! `saga-bench`'s measurements and its report (`make bench` writes it under `target/bench/`).
//!
//! Each measurement is written as JSON beside the report, with the command that made it;
//! [`report`] reads what is there, writes `report.md` and its SVG plots, and checks the
//! budgets.

pub mod load;
pub mod load_report;
pub mod peers;
pub mod report;
pub mod runtime_api;
pub mod svg;

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The machine a run was made on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub arch: String,
    pub node: String,
    pub python: String,
    pub rustc: String,
    pub git_commit: String,
    pub date_utc: String,
}

fn first_line(program: &str, args: &[&str], dir: &Path) -> String {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "(not found)".into())
}

impl Machine {
    pub fn describe(repo_root: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        let python = repo_root.join("bench/peers/.venv/bin/python");
        let mut git = first_line("git", &["rev-parse", "--short=12", "HEAD"], repo_root);
        if !first_line(
            "git",
            &["status", "--porcelain", "--untracked-files=no"],
            repo_root,
        )
        .is_empty()
        {
            git.push_str(" (with uncommitted changes)");
        }
        Machine {
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                .unwrap_or_else(|| "(unknown)".into()),
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            memory_gib: (memory_kib / 1_048_576.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            arch: std::env::consts::ARCH.into(),
            node: first_line("node", &["--version"], repo_root),
            python: if python.exists() {
                first_line(&python.display().to_string(), &["--version"], repo_root)
            } else {
                first_line("python3", &["--version"], repo_root)
            },
            rustc: first_line("rustc", &["--version"], repo_root),
            git_commit: git,
            date_utc: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        }
    }
}

/// Order statistics over samples (nearest rank on the sorted samples).
pub mod stats {
    pub fn sorted(samples: &[f64]) -> Vec<f64> {
        let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        s.sort_by(|a, b| a.total_cmp(b));
        s
    }

    /// The `p` quantile (0..=1); NaN for no samples.
    pub fn percentile(samples: &[f64], p: f64) -> f64 {
        let s = sorted(samples);
        if s.is_empty() {
            return f64::NAN;
        }
        s[((s.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize]
    }

    pub fn median(samples: &[f64]) -> f64 {
        percentile(samples, 0.5)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn percentiles_are_nearest_rank_on_sorted_samples() {
            let s = [5.0, 1.0, 3.0, 2.0, 4.0];
            assert_eq!(median(&s), 3.0);
            assert_eq!(percentile(&s, 0.0), 1.0);
            assert_eq!(percentile(&s, 1.0), 5.0);
            assert_eq!(percentile(&s, 0.99), 5.0);
            assert!(median(&[]).is_nan());
        }
    }
}
