//! The workloads (heartbeat, memory writer, CPU load, power-off timer) and the boot CPU's bring-up
//! sequence.
//!
//! Every CPU runs the same loop. One iteration: measure the gap since the previous iteration (time
//! the loop chose to sleep does not count), write the pages that are due, print the heartbeat when it
//! is due, spin if the CPU load's slice still wants work (`load`), then halt until the next thing is
//! due unless the writer runs at maximum rate. The boot CPU also polls the serial input.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::cmdline::{self, Config};
use crate::pvh::BootInfo;
use crate::sys::{cpuid, rdtsc};
use crate::{apic, console, load, net, platform, println, smp, virtio};

const PAGE: u64 = 4096;
/// A paced writer wakes this often (ms) to write the pages that fell due.
const BURST_MS: u64 = 10;
/// A maximum-rate writer checks the clock after this many pages.
const MAX_RATE_CHUNK: u64 = 256;
/// A paced writer writes at most this many pages per iteration.
const PACED_CHUNK: u64 = 4096;
/// An idle loop still wakes this often (ms).
const IDLE_MS: u64 = 1000;
/// The end of the identity map (`MAP_GIB` in boot.s): 16 GiB.
const MAP_END: u64 = 16 << 30;
/// The start of the 32-bit MMIO hole: RAM below it is the low range.
const LOW_RAM_LIMIT: u64 = 0xc000_0000;
/// The first byte above the 32-bit MMIO hole.
const HIGH_RAM_START: u64 = 1 << 32;
/// `tern.selftest=pagefault` reads here: the end of the identity map, never mapped whatever the RAM.
const SELFTEST_FAULT_ADDR: u64 = MAP_END;

unsafe extern "C" {
    static __image_end: u8;
}

static GO: AtomicBool = AtomicBool::new(false);
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
static START_TSC: AtomicU64 = AtomicU64::new(0);
static HB_MS: AtomicU64 = AtomicU64::new(0);
static DIRTY_BASE: AtomicU64 = AtomicU64::new(0);
static DIRTY_PAGES: AtomicU64 = AtomicU64::new(0);
static DIRTY_RATE: AtomicU64 = AtomicU64::new(0);
static POWEROFF_MS: AtomicU64 = AtomicU64::new(u64::MAX);
/// ms of workload after which a paced writer switches to its maximum rate (`tern.max_after_ms`).
static MAX_AFTER_MS: AtomicU64 = AtomicU64::new(u64::MAX);
static SELFTEST_CORRUPT: AtomicBool = AtomicBool::new(false);
/// `tern.dirty_fill=data`: the first touch of each page writes data, not zero.
static DIRTY_FILL: AtomicBool = AtomicBool::new(false);
static NET_TICK_US: AtomicU64 = AtomicU64::new(1000);
static INPUT_POLL_MS: AtomicU64 = AtomicU64::new(0);
/// Set by the boot CPU once every AP runs (the vCPU count is final): time to touch the buffer.
static PREPARE: AtomicBool = AtomicBool::new(false);
/// APs that have touched their slice of the writer's buffer.
static PREPARED: AtomicU32 = AtomicU32::new(0);

fn tsc_khz_from_cpuid() -> Option<u64> {
    let (max, _, _, _) = cpuid(0x4000_0000);
    if max < 0x4000_0010 {
        return None;
    }
    let (khz, _, _, _) = cpuid(0x4000_0010);
    (khz != 0).then_some(khz as u64)
}

/// The boot CPU: read the start info and command line, bring up the APs, run the checks, then the loop.
pub fn bsp_main(start_info: u64) -> ! {
    BOOT_TSC.store(rdtsc(), Ordering::Relaxed);
    console::init();
    let boot = match BootInfo::read(start_info) {
        Ok(b) => b,
        Err(e) => panic!("unusable PVH start info at {start_info:#x}: {e}"),
    };
    if boot.cmdline_truncated {
        panic!("command line longer than {} bytes", crate::pvh::CMDLINE_MAX);
    }
    let config = match cmdline::parse(boot.cmdline()) {
        Ok(c) => c,
        Err(bad) => panic!("bad value for {}: {:?}", bad.key, bad.value),
    };
    let Some(tsc_khz) = tsc_khz_from_cpuid() else {
        let (max, b, c, d) = cpuid(0x4000_0000);
        panic!(
            "no TSC frequency in CPUID 0x40000010 (QEMU: -cpu qemu64,tsc-frequency=<Hz>); \
             CPUID 0x40000000 = {max:#x} {b:#x} {c:#x} {d:#x}"
        )
    };
    TSC_KHZ.store(tsc_khz, Ordering::Relaxed);
    if let Err(e) = apic::configure(tsc_khz as u32) {
        panic!("local APIC unusable: {e:?}");
    }
    let self_id = apic::init_cpu();
    plan_writer(&boot, &config);
    HB_MS.store(config.hb_ms, Ordering::Relaxed);
    SELFTEST_CORRUPT.store(config.selftest_corrupt, Ordering::Relaxed);
    if let Some(ms) = config.poweroff_ms {
        POWEROFF_MS.store(ms, Ordering::Relaxed);
    }
    if let Some(ms) = config.max_after_ms {
        MAX_AFTER_MS.store(ms, Ordering::Relaxed);
    }
    INPUT_POLL_MS.store(config.input_poll_ms, Ordering::Relaxed);

    let cpus = smp::discover(&boot);
    {
        let mut line = console::Line::new();
        let _ = write!(line, "TERN-GUEST cpus source={} apic_ids=", cpus.source);
        for (i, id) in cpus.ids[..cpus.len].iter().enumerate() {
            let _ = write!(line, "{}{id}", if i == 0 { "" } else { "," });
        }
        let timer = if apic::tsc_deadline_mode() {
            "tsc-deadline"
        } else {
            "oneshot"
        };
        let _ = write!(line, " timer={timer}");
        line.emit();
    }
    let n = smp::start_aps(&boot, &cpus, self_id, tsc_khz);
    // Every vCPU touches its slice of the writer's buffer once before the workload starts, so the
    // first pass does not pay the hypervisor's first-touch cost and the rate holds from the start.
    PREPARE.store(true, Ordering::Release);
    if let Some(w) = Writer::for_cpu(0, n) {
        w.pretouch();
    }
    while (PREPARED.load(Ordering::Acquire) as usize) < n - 1 {
        core::hint::spin_loop();
    }
    let dirty_base = DIRTY_BASE.load(Ordering::Relaxed);
    if dirty_base == 0 {
        println!(
            "TERN-GUEST up cpus={n} tsc_khz={tsc_khz} mem_mib={}",
            boot.mem_mib()
        );
    } else {
        println!(
            "TERN-GUEST up cpus={n} tsc_khz={tsc_khz} mem_mib={} dirty_base_mib={}",
            boot.mem_mib(),
            dirty_base >> 20
        );
    }
    let start = rdtsc();
    START_TSC.store(start, Ordering::Relaxed);
    load::configure(&config, start, tsc_khz);
    if config.load != cmdline::Load::Off {
        load::report(start);
    }
    GO.store(true, Ordering::Release);

    if config.selftest_fault {
        // Nothing is mapped from 16 GiB on: this read takes a page fault to the kernel, which reports it.
        // SAFETY: deliberately faulting; the read never completes.
        let v = unsafe { core::ptr::read_volatile(SELFTEST_FAULT_ADDR as *const u64) };
        panic!("read of unmapped memory returned {v:#x}");
    }

    if config.blk_verify {
        match virtio::blk_verify(tsc_khz) {
            virtio::Outcome::Ok { sectors } => println!("BLK verify ok sectors={sectors}"),
            virtio::Outcome::Fail(reason) => println!("BLK verify FAIL {reason}"),
        }
    }
    let net = config.ip.and_then(|(ip, prefix)| {
        let now_us = ((rdtsc() - BOOT_TSC.load(Ordering::Relaxed)) * 1000 / tsc_khz) as i64;
        match net::Net::up(ip, prefix, config.echo_port, now_us) {
            Ok(net) => {
                let (slot, version, m) = net.describe();
                println!(
                    "NET up slot={slot} version={version} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip={}.{}.{}.{}/{prefix} echo_port={}",
                    m[0], m[1], m[2], m[3], m[4], m[5], ip[0], ip[1], ip[2], ip[3], config.echo_port
                );
                NET_TICK_US.store(config.net_tick_us, Ordering::Relaxed);
                Some(net)
            }
            Err(e) => {
                println!("NET FAIL {e}");
                None
            }
        }
    });
    run(0, n, net)
}

/// Places the writer's buffer, 2 MiB aligned, and checks it is RAM: at the start of the first RAM
/// range above the 32-bit MMIO hole if it fits there below the end of the identity map (a guest of
/// more than 3 GiB writes its working set in its high memory), else after the image, below 3 GiB.
fn plan_writer(boot: &BootInfo, config: &Config) {
    if config.dirty_mib == 0 {
        return;
    }
    let len = config.dirty_mib.saturating_mul(1 << 20);
    let fits = |base: u64, limit: u64| {
        base.checked_add(len).is_some_and(|top| top <= limit) && boot.is_ram(base, len)
    };
    let high = boot
        .ram()
        .map(|r| r.addr.next_multiple_of(2 << 20))
        .filter(|&b| b >= HIGH_RAM_START)
        .find(|&b| fits(b, MAP_END));
    let low = (&raw const __image_end as u64).next_multiple_of(2 << 20);
    let base = match high {
        Some(b) => b,
        None if fits(low, LOW_RAM_LIMIT) => low,
        None => panic!(
            "tern.dirty_mib={} does not fit: the buffer at {low:#x} needs RAM up to {} MiB below 3 GiB, or {} MiB in one RAM range from 4 GiB to 16 GiB (have {} MiB)",
            config.dirty_mib,
            low.saturating_add(len) >> 20,
            config.dirty_mib,
            boot.mem_mib()
        ),
    };
    DIRTY_BASE.store(base, Ordering::Relaxed);
    DIRTY_PAGES.store(len / PAGE, Ordering::Relaxed);
    DIRTY_RATE.store(config.dirty_rate, Ordering::Relaxed);
    DIRTY_FILL.store(config.dirty_fill, Ordering::Relaxed);
}

/// An application processor, entered at CPL3 from the trampoline path in boot.s.
pub fn ap_main(cpu: usize) -> ! {
    smp::AP_ARRIVED.store(cpu as u64, Ordering::Release);
    apic::init_cpu();
    while !PREPARE.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    let n = smp::CPUS.load(Ordering::Acquire) as usize;
    if let Some(w) = Writer::for_cpu(cpu, n) {
        w.pretouch();
    }
    PREPARED.fetch_add(1, Ordering::Release);
    while !GO.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    run(cpu, n, None)
}

/// This CPU's share of the writer: a slice of the buffer and of the rate.
struct Writer {
    base: u64,
    pages: u64,
    /// Pages per second (0 = maximum rate).
    rate: u64,
    pos: u64,
    written: u64,
    /// Pages the schedule has forgiven after a long stall (so the writer does not burst to catch up).
    forgiven: u64,
}

impl Writer {
    fn for_cpu(cpu: usize, n: usize) -> Option<Writer> {
        let total = DIRTY_PAGES.load(Ordering::Relaxed);
        if total == 0 {
            return None;
        }
        let (n, cpu) = (n as u64, cpu as u64);
        let pages = total / n;
        let rate_total = DIRTY_RATE.load(Ordering::Relaxed);
        let rate = rate_total / n + u64::from(cpu < rate_total % n);
        if pages == 0 || (rate_total != 0 && rate == 0) {
            return None;
        }
        let base = DIRTY_BASE.load(Ordering::Relaxed) + cpu * pages * PAGE;
        Some(Writer {
            base,
            pages,
            rate,
            pos: 0,
            written: 0,
            forgiven: 0,
        })
    }

    /// Writes every page of the slice once, with 0 or, with `tern.dirty_fill=data`, the page's
    /// own address (never 0: the buffer lies above 1 MiB), so that the buffer is data a VMM must
    /// send rather than zero pages it may skip. The first pass checks nothing of either.
    fn pretouch(&self) {
        let fill = DIRTY_FILL.load(Ordering::Relaxed);
        for i in 0..self.pages {
            let p = self.base + i * PAGE;
            // SAFETY: the page lies in this CPU's slice of the RAM buffer plan_writer checked.
            unsafe { (p as *mut u64).write_volatile(if fill { p } else { 0 }) };
        }
    }

    /// Writes the next `count` pages. Each page's first 8 bytes get the running page count; before
    /// overwriting, the writer checks the page still holds what it wrote one pass earlier
    /// (`written - pages`), so memory lost or corrupted by the VMM (e.g. a page a migration failed to
    /// send) stops the guest with a `PANIC` within one pass.
    fn write(&mut self, count: u64) {
        for _ in 0..count {
            let p = (self.base + self.pos * PAGE) as *mut u64;
            if let Some(expected) = self.written.checked_sub(self.pages) {
                // SAFETY: the page lies in this CPU's slice of the RAM buffer plan_writer checked.
                let found = unsafe { p.read_volatile() };
                if found != expected {
                    panic!(
                        "memory check failed: page {:#x} holds {found:#x}, expected {expected:#x}",
                        p as u64
                    );
                }
            }
            // SAFETY: as above.
            unsafe { p.write_volatile(self.written) };
            self.written += 1;
            self.pos += 1;
            if self.pos == self.pages {
                self.pos = 0;
                if self.written == self.pages && SELFTEST_CORRUPT.swap(false, Ordering::Relaxed) {
                    // SAFETY: the first page of this CPU's slice; tern.selftest=corruptpage asked
                    // for exactly this damage, which the next pass must detect.
                    unsafe { (self.base as *mut u64).write_volatile(0xbad0_bad0) };
                }
            }
        }
    }

    /// Pages due by `now` under the paced schedule that started at `start`.
    fn due(&mut self, start: u64, now: u64, ticks_per_s: u64) -> u64 {
        let target = ((now - start) as u128 * self.rate as u128 / ticks_per_s as u128) as u64;
        let due = target.saturating_sub(self.written + self.forgiven);
        let cap = (self.rate / 10).max(1);
        if due > cap {
            self.forgiven += due - cap;
            return cap;
        }
        due
    }
}

fn run(cpu: usize, n: usize, mut net: Option<net::Net>) -> ! {
    let khz = TSC_KHZ.load(Ordering::Relaxed);
    let ms = |v: u64| v.saturating_mul(khz);
    let ticks_per_s = khz * 1000;
    let boot = BOOT_TSC.load(Ordering::Relaxed);
    let start = START_TSC.load(Ordering::Relaxed);
    let hb_ticks = ms(HB_MS.load(Ordering::Relaxed));
    let poweroff_ms = POWEROFF_MS.load(Ordering::Relaxed);
    let poweroff_at = if cpu == 0 && poweroff_ms != u64::MAX {
        start + ms(poweroff_ms)
    } else {
        u64::MAX
    };
    let suffix_cpu = n > 1;
    let mut writer = Writer::for_cpu(cpu, n);
    let max_after_ms = MAX_AFTER_MS.load(Ordering::Relaxed);
    let mut max_at = if max_after_ms != u64::MAX && writer.is_some() {
        start + ms(max_after_ms)
    } else {
        u64::MAX
    };
    let wstart = rdtsc();

    let mut seq = 0u64;
    let mut next_hb = if hb_ticks > 0 {
        rdtsc() + hb_ticks
    } else {
        u64::MAX
    };
    let mut last_hb = rdtsc();
    let mut written_at_hb = 0u64;
    // Start of the previous loop iteration: a gap is measured start to start, so a pause that falls
    // inside an iteration's work (a maximum-rate writer never sleeps) is seen too.
    let mut prev_start = rdtsc();
    let mut slept_until = 0u64;
    let mut maxgap = 0u64;
    let net_tick = NET_TICK_US.load(Ordering::Relaxed).saturating_mul(khz) / 1000;
    let now_us = |t: u64| ((t - boot) * 1000 / khz) as i64;
    let input_poll = ms(INPUT_POLL_MS.load(Ordering::Relaxed));
    let mut input = (cpu == 0 && input_poll > 0).then(load::Input::new);
    let mut next_poll = rdtsc();

    loop {
        let now = rdtsc();
        maxgap = maxgap.max(now.saturating_sub(prev_start.max(slept_until)));
        prev_start = now;
        slept_until = 0;

        if now >= max_at {
            max_at = u64::MAX;
            if let Some(w) = writer.as_mut() {
                w.rate = 0;
            }
            if suffix_cpu {
                println!("DIRTY switch rate=max cpu={cpu}");
            } else {
                println!("DIRTY switch rate=max");
            }
        }

        let mut behind = false;
        if let Some(w) = writer.as_mut() {
            if w.rate == 0 {
                w.write(MAX_RATE_CHUNK);
            } else {
                let due = w.due(wstart, now, ticks_per_s);
                let chunk = due.min(PACED_CHUNK);
                w.write(chunk);
                behind = due > chunk;
            }
        }

        let mut net_busy = false;
        if let Some(net) = net.as_mut() {
            net_busy = net.poll(now_us(now));
        }

        if now >= poweroff_at {
            println!("TERN-GUEST poweroff after_ms={poweroff_ms}");
            platform::stop(0);
        }

        if now >= next_hb {
            seq += 1;
            let t_us = (now - boot) * 1000 / khz;
            let gap_us = maxgap * 1000 / khz;
            let mut line = console::Line::new();
            let _ = write!(line, "HB seq={seq} t_us={t_us} maxgap_us={gap_us}");
            if let Some(t) = load::target(now) {
                let _ = write!(line, " load_pct={}", t.pct);
            }
            if suffix_cpu {
                let _ = write!(line, " cpu={cpu}");
            }
            line.emit();
            if let Some(w) = writer.as_ref() {
                let rate = (w.written - written_at_hb) as u128 * ticks_per_s as u128
                    / (now - last_hb).max(1) as u128;
                if suffix_cpu {
                    println!("DIRTY pages={} rate={rate} cpu={cpu}", w.written);
                } else {
                    println!("DIRTY pages={} rate={rate}", w.written);
                }
                written_at_hb = w.written;
            }
            if let Some(net) = net.as_ref() {
                let s = net.stats;
                println!(
                    "NET tcp_accepts={} tcp_bytes={} udp_packets={}",
                    s.tcp_accepts, s.tcp_bytes, s.udp_packets
                );
            }
            last_hb = now;
            maxgap = 0;
            next_hb += hb_ticks;
            if next_hb <= now {
                next_hb = now + hb_ticks;
            }
        }

        let mut wake_load = u64::MAX;
        if let Some(input) = input.as_mut() {
            if now >= next_poll {
                input.poll();
                next_poll = rdtsc() + input_poll;
            }
            input.report_step(now);
            wake_load = next_poll;
        }
        let mut spinning = false;
        match load::duty(rdtsc()) {
            load::Duty::Busy => spinning = true,
            load::Duty::IdleUntil(t) => wake_load = wake_load.min(t),
            load::Duty::None => {}
        }

        let last = rdtsc();
        let max_rate = writer.as_ref().is_some_and(|w| w.rate == 0);
        if max_rate || behind || net_busy || spinning {
            continue;
        }
        let mut wake = next_hb
            .min(poweroff_at)
            .min(last + ms(IDLE_MS))
            .min(wake_load);
        if writer.is_some() {
            wake = wake.min(last + ms(BURST_MS));
        }
        if net.is_some() {
            // The network is polled: a short tick bounds the latency (and costs host CPU).
            wake = wake.min(last + net_tick.max(1));
        }
        apic::sleep_until(wake);
        slept_until = wake;
    }
}
