-- Demo PACS auto-routing: forward every CR/DX image received (DICOM or web upload) to
-- the CXR node (modality "cxr" in orthanc.json). Results that the node sends back (SC/SR from AE
-- CXR_WORKER) are stored, never forwarded again, so there is no loop.

CXR_MODALITY = 'cxr'
CXR_AET = 'CXR_WORKER'
ROUTED_MODALITIES = { CR = true, DX = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
  local requestOrigin = (origin and origin['RequestOrigin']) or ''
  local sender = (origin and origin['RemoteAet']) or metadata['RemoteAET'] or ''
  if requestOrigin == 'DicomProtocol' and sender == CXR_AET then
    return  -- a result from the triage worker: keep it, do not route it again
  end
  local modality = tags['Modality'] or ''
  if ROUTED_MODALITIES[modality] then
    print('cxr-route: sending instance ' .. instanceId .. ' (' .. modality .. ') to ' .. CXR_MODALITY)
    SendToModality(instanceId, CXR_MODALITY)
  end
end
