//! KVM's binary statistics for a vCPU (KVM_GET_STATS_FD, Linux 5.14+): named counters the VMM reads
//! with pread, without interrupting the vCPU. Tapir reads `blocking` to know when a vCPU sleeps in
//! KVM, and the exit counters for its figures.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// _IO(KVMIO, 0xce).
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
const HEADER_LEN: usize = 24;
const DESC_FIXED_LEN: usize = 16;

/// Where one statistic's value lives in the stats file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    offset: u64,
}

/// A parsed descriptor block: (name, offset of the value from the data block's start).
pub fn parse_descriptors(header: &[u8], descs: &[u8]) -> Option<(u64, Vec<(String, u64)>)> {
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let name_size = u32_at(header, 4)? as usize;
    let num_desc = u32_at(header, 8)? as usize;
    let data_offset = u64::from(u32_at(header, 20)?);
    let step = DESC_FIXED_LEN + name_size;
    let mut out = Vec::with_capacity(num_desc);
    for i in 0..num_desc {
        let d = descs.get(i * step..(i + 1) * step)?;
        let offset = u64::from(u32_at(d, 8)?);
        let name = &d[DESC_FIXED_LEN..];
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        out.push((String::from_utf8_lossy(&name[..end]).into_owned(), offset));
    }
    Some((data_offset, out))
}

/// A vCPU's statistics file.
#[derive(Debug)]
pub struct VcpuStats {
    file: File,
    data_offset: u64,
    names: Vec<(String, u64)>,
}

impl VcpuStats {
    /// Opens the statistics of `vcpu`; fails on kernels without binary stats.
    pub fn open(vcpu: &impl AsRawFd) -> io::Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor or -1.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD as _) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned to us by the kernel and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0)?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed KVM stats header");
        let num_desc = u32::from_le_bytes(header[8..12].try_into().map_err(|_| bad())?) as usize;
        let name_size = u32::from_le_bytes(header[4..8].try_into().map_err(|_| bad())?) as usize;
        let desc_offset = u64::from(u32::from_le_bytes(
            header[16..20].try_into().map_err(|_| bad())?,
        ));
        let mut descs = vec![0u8; num_desc * (DESC_FIXED_LEN + name_size)];
        file.read_exact_at(&mut descs, desc_offset)?;
        let (data_offset, names) = parse_descriptors(&header, &descs).ok_or_else(bad)?;
        Ok(Self {
            file,
            data_offset,
            names,
        })
    }

    /// The statistic called `name`, if this kernel has it.
    pub fn find(&self, name: &str) -> Option<Stat> {
        self.names
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, offset)| Stat {
                offset: self.data_offset + offset,
            })
    }

    /// The current value of `stat`.
    pub fn read(&self, stat: Stat) -> io::Result<u64> {
        let mut value = [0u8; 8];
        self.file.read_exact_at(&mut value, stat.offset)?;
        Ok(u64::from_ne_bytes(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(offset: u32, name: &str, name_size: usize) -> Vec<u8> {
        let mut d = vec![0u8; DESC_FIXED_LEN + name_size];
        d[8..12].copy_from_slice(&offset.to_le_bytes());
        d[DESC_FIXED_LEN..DESC_FIXED_LEN + name.len()].copy_from_slice(name.as_bytes());
        d
    }

    #[test]
    fn descriptors_give_names_and_value_offsets() {
        let name_size = 48;
        let mut header = vec![0u8; HEADER_LEN];
        header[4..8].copy_from_slice(&(name_size as u32).to_le_bytes());
        header[8..12].copy_from_slice(&2u32.to_le_bytes());
        header[20..24].copy_from_slice(&4096u32.to_le_bytes());
        let mut descs = desc(0, "halt_exits", name_size);
        descs.extend(desc(8, "blocking", name_size));
        let (data, names) = parse_descriptors(&header, &descs).unwrap();
        assert_eq!(data, 4096);
        assert_eq!(
            names,
            vec![("halt_exits".into(), 0), ("blocking".into(), 8)]
        );
        assert_eq!(
            parse_descriptors(&header, &descs[..10]),
            None,
            "truncated block"
        );
    }
}
