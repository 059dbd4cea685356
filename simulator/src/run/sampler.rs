//! CPU and resident memory of a process, read from `/proc` once a second
//! for the report's hub charts.

use std::time::Instant;

/// Reads one process's CPU time and memory.
#[derive(Debug)]
pub struct ProcessSampler {
    pid: u32,
    ticks_per_second: f64,
    page_bytes: u64,
    last: Option<(Instant, u64)>,
}

impl ProcessSampler {
    pub fn new(pid: u32) -> Self {
        use nix::unistd::{SysconfVar, sysconf};
        let ticks = sysconf(SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100);
        let page = sysconf(SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096);
        Self {
            pid,
            ticks_per_second: ticks as f64,
            page_bytes: u64::try_from(page).unwrap_or(4096),
            last: None,
        }
    }

    /// The process it reads.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// CPU use since the previous sample (100 = one core) and resident
    /// bytes now; zeros if the process cannot be read.
    pub fn sample(&mut self) -> (f64, u64) {
        let now = Instant::now();
        let ticks = self.cpu_ticks();
        let cpu = match (self.last, ticks) {
            (Some((then, before)), Some(ticks)) => {
                let seconds = now.duration_since(then).as_secs_f64();
                if seconds > 0.0 {
                    ticks.saturating_sub(before) as f64 / self.ticks_per_second / seconds * 100.0
                } else {
                    0.0
                }
            }
            _ => 0.0,
        };
        if let Some(ticks) = ticks {
            self.last = Some((now, ticks));
        }
        (cpu, self.rss_bytes().unwrap_or(0))
    }

    fn cpu_ticks(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // The command name may hold spaces; fields resume after its ')'.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some(utime + stime)
    }

    fn rss_bytes(&self) -> Option<u64> {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.pid)).ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * self.page_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let mut sampler = ProcessSampler::new(std::process::id());
        let (_, rss) = sampler.sample();
        assert!(rss > 1024 * 1024, "rss {rss}");
        // Burn some CPU so the second sample sees it.
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed().as_millis() < 200 {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let (cpu, _) = sampler.sample();
        assert!(cpu > 20.0, "cpu {cpu}");
        assert_eq!(ProcessSampler::new(u32::MAX).sample(), (0.0, 0));
    }
}
