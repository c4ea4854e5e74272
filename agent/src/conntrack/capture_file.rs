//! The file format of `nattrail capture`: per datagram a little-endian u32 length, then the
//! bytes as received from the kernel.

/// Appends one datagram in capture format.
pub fn write_datagram(out: &mut impl std::io::Write, datagram: &[u8]) -> std::io::Result<()> {
    out.write_all(&(datagram.len() as u32).to_le_bytes())?;
    out.write_all(datagram)
}

/// Splits a capture file into its datagrams; `Err` names the offset of a truncated record.
pub fn read_datagrams(mut bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut offset = 0;
    while !bytes.is_empty() {
        let header: [u8; 4] = bytes
            .get(..4)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| format!("truncated record header at offset {offset}"))?;
        let n = u32::from_le_bytes(header) as usize;
        let body = bytes
            .get(4..4 + n)
            .ok_or_else(|| format!("record at offset {offset} claims {n} bytes past the end"))?;
        out.push(body);
        bytes = &bytes[4 + n..];
        offset += 4 + n;
    }
    Ok(out)
}
