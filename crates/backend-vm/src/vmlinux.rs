//! The uncompressed kernel Firecracker boots, made from the `bzImage` a distribution ships.
//!
//! Firecracker on x86-64 loads an ELF `vmlinux` and enters it in 64-bit mode (its releases
//! to date take no `bzImage`; its API says only "host level path to the kernel image").
//! Debian's `vmlinuz` is a `bzImage`: real-mode setup code, then a decompressor carrying the
//! kernel's ELF as a compressed payload. The x86 boot protocol (2.08 and later) says where
//! that payload is: the protected-mode code starts after `(setup_sects + 1) * 512` bytes, and
//! `payload_offset` and `payload_length` in the setup header (at 0x248 and 0x24c) place the
//! payload within it. Every compressor but gzip is followed by the uncompressed length, four
//! bytes little-endian (the kernel's `size_append`), which is checked. Debian's cloud kernel
//! compresses with LZ4 in its legacy frame format (magic `02 21 4c 18`, then blocks each
//! preceded by its compressed length); gzip and zstd are taken too. The result is checked
//! to be a 64-bit ELF and kept in the cache beside the initramfs, made once per kernel.
//!
//! By hand, the same is `scripts/extract-vmlinux` of a kernel tree (it looks for each
//! compressor's magic rather than reading the header), or with Python and the `lz4` tool:
//! read `setup_sects` (byte 0x1f1) and the two words at 0x248, cut the payload out and
//! `lz4 -dc` it.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Errors making a `vmlinux`.
#[derive(Debug, thiserror::Error)]
pub enum VmlinuxError {
    #[error("cannot read the kernel {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "the kernel {path} is neither an ELF vmlinux nor a bzImage whose kernel can be taken \
         out: {reason}; name an uncompressed vmlinux with --kernel or $UPSTREAM_VM_KERNEL \
         (a kernel tree's scripts/extract-vmlinux makes one)"
    )]
    Unusable { path: PathBuf, reason: String },
    #[error("cannot keep the vmlinux at {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The most a kernel may take uncompressed: far more than any distribution's.
const MOST: u64 = 512 << 20;

/// Whether `bytes` start as a 64-bit little-endian ELF file.
pub fn is_elf64(bytes: &[u8]) -> bool {
    bytes.len() >= 6 && bytes[..4] == *b"\x7fELF" && bytes[4] == 2 && bytes[5] == 1
}

/// The `vmlinux` of `kernel`: the kernel itself when it is one, else taken out of the
/// `bzImage` once and kept in `cache`.
pub fn of(kernel: &Path, cache: &Path) -> Result<PathBuf, VmlinuxError> {
    let read = |source| VmlinuxError::Read {
        path: kernel.to_path_buf(),
        source,
    };
    let mut head = [0u8; 6];
    let mut file = fs::File::open(kernel).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    if file.read_exact(&mut head).is_ok() && is_elf64(&head) {
        return Ok(kernel.to_path_buf());
    }
    let mut key = blake3::Hasher::new();
    key.update(b"upstream vmlinux 1\0");
    for n in [meta.dev(), meta.ino(), meta.size(), meta.mtime() as u64] {
        key.update(&n.to_le_bytes());
    }
    key.update(kernel.as_os_str().as_encoded_bytes());
    let path = cache.join(format!("vmlinux-{}", &key.finalize().to_hex()[..24]));
    if path.is_file() {
        return Ok(path);
    }
    if meta.len() > MOST {
        return Err(VmlinuxError::Unusable {
            path: kernel.to_path_buf(),
            reason: format!("it is over {} MiB", MOST >> 20),
        });
    }
    let image = fs::read(kernel).map_err(read)?;
    let elf = extract(&image).map_err(|reason| VmlinuxError::Unusable {
        path: kernel.to_path_buf(),
        reason,
    })?;
    let write = |source| VmlinuxError::Write {
        path: path.clone(),
        source,
    };
    fs::create_dir_all(cache).map_err(write)?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = cache.join(format!(".vmlinux-{}-{n}.tmp", std::process::id()));
    let made = (|| {
        let mut out = fs::File::create(&temp)?;
        out.write_all(&elf)?;
        out.sync_all()?;
        fs::rename(&temp, &path)
    })();
    if let Err(e) = made {
        let _ = fs::remove_file(&temp);
        return Err(write(e));
    }
    Ok(path)
}

/// The ELF kernel inside the `bzImage` `image`.
pub fn extract(image: &[u8]) -> Result<Vec<u8>, String> {
    if image.len() < 0x250 || &image[0x202..0x206] != b"HdrS" {
        return Err("it has no x86 boot header (HdrS at 0x202)".into());
    }
    let word =
        |at: usize| u32::from_le_bytes([image[at], image[at + 1], image[at + 2], image[at + 3]]);
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    if version < 0x208 {
        return Err(format!(
            "its boot protocol is {}.{:02}, older than 2.08, which places the payload",
            version >> 8,
            version & 0xff
        ));
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512;
    let offset = word(0x248) as usize;
    let length = word(0x24c) as usize;
    let payload = start
        .checked_add(offset)
        .and_then(|from| Some((from, from.checked_add(length)?)))
        .and_then(|(from, to)| image.get(from..to))
        .ok_or_else(|| {
            format!("its payload ({length} bytes at {offset} past {start}) runs past its end")
        })?;
    let elf = decompress(payload)?;
    if !is_elf64(&elf) {
        return Err("its payload decompressed to something that is not a 64-bit ELF".into());
    }
    Ok(elf)
}

/// The bytes of a payload of any compressor this knows.
fn decompress(payload: &[u8]) -> Result<Vec<u8>, String> {
    let sized = |payload: &[u8]| -> Result<(Vec<u8>, usize), String> {
        // The payload ends with its uncompressed length (`size_append`).
        let Some(split) = payload.len().checked_sub(4) else {
            return Err("its payload is too short".into());
        };
        let (body, size) = payload.split_at(split);
        let size = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize;
        if size as u64 > MOST {
            return Err(format!("its payload says it is {size} bytes uncompressed"));
        }
        Ok((body.to_vec(), size))
    };
    let check = |out: Vec<u8>, size: usize| {
        if out.len() == size {
            Ok(out)
        } else {
            Err(format!(
                "its payload decompressed to {} bytes, not the {size} it says",
                out.len()
            ))
        }
    };
    match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => {
            let (body, size) = sized(payload)?;
            check(lz4_legacy(&body[4..], size)?, size)
        }
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            let (body, size) = sized(payload)?;
            let mut out = Vec::with_capacity(size);
            zstd::stream::read::Decoder::new(body.as_slice())
                .map_err(|e| format!("its zstd payload: {e}"))?
                .take(MOST)
                .read_to_end(&mut out)
                .map_err(|e| format!("its zstd payload: {e}"))?;
            check(out, size)
        }
        [0x1f, 0x8b, ..] => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(payload)
                .take(MOST)
                .read_to_end(&mut out)
                .map_err(|e| format!("its gzip payload: {e}"))?;
            Ok(out)
        }
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Err("its payload is xz-compressed".into()),
        [0x5d, 0, 0, ..] => Err("its payload is lzma-compressed".into()),
        [b'B', b'Z', b'h', ..] => Err("its payload is bzip2-compressed".into()),
        [0x89, b'L', b'Z', b'O', ..] => Err("its payload is lzo-compressed".into()),
        _ => Err("its payload is in no compression format this knows".into()),
    }
}

/// LZ4's legacy frame (after its magic): blocks of at most 8 MiB, each after its
/// compressed length, to `size` bytes in all.
fn lz4_legacy(mut blocks: &[u8], size: usize) -> Result<Vec<u8>, String> {
    const BLOCK: usize = 8 << 20;
    let mut out = vec![0u8; size];
    let mut filled = 0;
    while filled < size {
        let Some((len, rest)) = blocks.split_first_chunk::<4>() else {
            return Err(format!(
                "its lz4 payload ends after {filled} of {size} bytes"
            ));
        };
        let len = u32::from_le_bytes(*len) as usize;
        let Some(block) = rest.get(..len) else {
            return Err("its lz4 payload has a block that runs past its end".into());
        };
        let room = (size - filled).min(BLOCK);
        let made = lz4_flex::block::decompress_into(block, &mut out[filled..filled + room])
            .map_err(|e| format!("its lz4 payload: {e}"))?;
        filled += made;
        blocks = &rest[len..];
        if made == 0 {
            return Err("its lz4 payload has an empty block".into());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `bzImage` around `payload`, as the boot protocol lays one out.
    fn bz_image(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 2u8;
        let start = (setup_sects as usize + 1) * 512;
        let offset = 100usize;
        let mut image = vec![0u8; start + offset];
        image[0x1f1] = setup_sects;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&(offset as u32).to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(payload);
        image.extend_from_slice(b"decompressor code after the payload");
        image
    }

    fn kernel_elf() -> Vec<u8> {
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.extend((0..300_000u32).flat_map(|i| (i % 251).to_le_bytes()));
        elf
    }

    #[test]
    fn an_lz4_payload_in_legacy_frames_is_taken_out_whole() {
        let elf = kernel_elf();
        let mut payload = vec![0x02, 0x21, 0x4c, 0x18];
        // Two blocks, as the legacy format cuts at 8 MiB (here smaller: any cut works).
        for part in elf.chunks(700_000) {
            let block = lz4_flex::block::compress(part);
            payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
            payload.extend_from_slice(&block);
        }
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        assert_eq!(extract(&bz_image(&payload)).unwrap(), elf);
        // A size that disagrees with the blocks is refused, not padded.
        let mut lying = payload.clone();
        let n = lying.len();
        lying[n - 4..].copy_from_slice(&(elf.len() as u32 + 1).to_le_bytes());
        assert!(extract(&bz_image(&lying)).is_err());
    }

    #[test]
    fn zstd_and_gzip_payloads_are_taken_out_too() {
        let elf = kernel_elf();
        let mut payload = zstd::encode_all(elf.as_slice(), 3).unwrap();
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        assert_eq!(extract(&bz_image(&payload)).unwrap(), elf);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let payload = gz.finish().unwrap();
        assert_eq!(extract(&bz_image(&payload)).unwrap(), elf);
    }

    #[test]
    fn what_cannot_be_taken_out_says_why() {
        let e = extract(b"not a kernel at all").unwrap_err();
        assert!(e.contains("boot header"), "{e}");
        let e = extract(&bz_image(&[0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2])).unwrap_err();
        assert!(e.contains("xz"), "{e}");
        // A payload that says it runs past the image's end.
        let mut image = bz_image(b"\x02\x21\x4c\x18");
        image[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = extract(&image).unwrap_err();
        assert!(e.contains("past its end"), "{e}");
        // A payload that is no ELF.
        let mut payload = zstd::encode_all(&b"plain bytes"[..], 3).unwrap();
        payload.extend_from_slice(&11u32.to_le_bytes());
        let e = extract(&bz_image(&payload)).unwrap_err();
        assert!(e.contains("not a 64-bit ELF"), "{e}");
    }

    #[test]
    fn a_vmlinux_is_used_as_it_is_and_a_bzimage_once() {
        let dir = tempfile::tempdir().unwrap();
        let elf = kernel_elf();
        let vmlinux = dir.path().join("vmlinux");
        fs::write(&vmlinux, &elf).unwrap();
        let cache = dir.path().join("cache");
        assert_eq!(of(&vmlinux, &cache).unwrap(), vmlinux);
        let mut payload = zstd::encode_all(elf.as_slice(), 3).unwrap();
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        let bz = dir.path().join("vmlinuz-test");
        fs::write(&bz, bz_image(&payload)).unwrap();
        let made = of(&bz, &cache).unwrap();
        assert!(made.starts_with(&cache));
        assert_eq!(fs::read(&made).unwrap(), elf);
        let modified = fs::metadata(&made).unwrap().modified().unwrap();
        assert_eq!(of(&bz, &cache).unwrap(), made);
        assert_eq!(fs::metadata(&made).unwrap().modified().unwrap(), modified);
        let e = of(&dir.path().join("none"), &cache).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }

    /// Debian's cloud kernel, where scripts/vm-kernel unpacked it: its LZ4 payload comes out
    /// as the ELF it says it is.
    #[test]
    fn debians_cloud_kernel_gives_its_vmlinux() {
        let kernel = crate::boot::Kernel::find(None)
            .expect("no guest kernel here: scripts/vm-kernel unpacks Debian's");
        let image = fs::read(&kernel.image).unwrap();
        assert!(
            !is_elf64(&image),
            "{} is a vmlinux already",
            kernel.image.display()
        );
        assert_eq!(&image[0x202..0x206], b"HdrS");
        let elf = extract(&image).unwrap();
        assert!(is_elf64(&elf));
        assert!(elf.len() > image.len(), "{} <= {}", elf.len(), image.len());
    }
}
