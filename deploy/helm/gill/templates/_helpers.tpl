{{/* Names and labels shared by every object of the chart. */}}

{{- define "gill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gill.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gill.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gill.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gill
{{- end }}

{{/* The serving pods: what the Service, PDB, NetworkPolicy and the ingest Job's affinity select. */}}
{{- define "gill.serverSelectorLabels" -}}
{{ include "gill.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "gill.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "gill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gill.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gill.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "gill.fullname" .)) .Values.apiKey.existingSecret }}
{{- end }}

{{- define "gill.weightsClaimName" -}}
{{- default (printf "%s-weights" (include "gill.fullname" .)) .Values.weights.existingClaim }}
{{- end }}

{{/* The gill command inside the image (the venv of deploy/Dockerfile). */}}
{{- define "gill.bin" -}}/opt/gill/venv/bin/gill{{- end }}

{{- define "gill.ingestFile" -}}
{{- default (printf "%s/cc3m_embeddings_urls.npy" .Values.weights.mountPath) .Values.ingest.file }}
{{- end }}

{{/*
The init containers that fill and check the weights volume (the server pods and the ingest Job share them).
Arguments: (dict "root" $ "withEmbeddings" bool "verify" bool).
*/}}
{{- define "gill.weightsInitContainers" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- if $values.weights.download.enabled }}
- name: download-weights
  image: {{ include "gill.image" $root }}
  imagePullPolicy: {{ $values.image.pullPolicy }}
  # Pods starting together take turns on the lock; each then finds the files present and verified.
  command:
    - /usr/bin/flock
    - {{ printf "%s/.download.lock" $values.weights.mountPath }}
    - {{ include "gill.bin" $root }}
    - download
    - {{ $values.weights.mountPath }}
    - --quiet
    {{- if .withEmbeddings }}
    - --with-embeddings
    {{- end }}
    {{- with $values.weights.download.endpoint }}
    - --endpoint
    - {{ . | quote }}
    {{- end }}
  {{- with $values.weights.download.hfToken.secretName }}
  env:
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ . }}
          key: {{ $values.weights.download.hfToken.secretKey }}
  {{- end }}
  resources:
    {{- toYaml $values.weights.download.resources | nindent 4 }}
  securityContext:
    {{- toYaml $values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: weights, mountPath: {{ $values.weights.mountPath }}}
    - {name: tmp, mountPath: /tmp}
{{- end }}
{{- if and .verify $values.weights.verify.enabled }}
- name: verify-weights
  image: {{ include "gill.image" $root }}
  imagePullPolicy: {{ $values.image.pullPolicy }}
  command:
    - {{ include "gill.bin" $root }}
    - verify
    - {{ $values.weights.mountPath }}
  resources:
    {{- toYaml $values.weights.verify.resources | nindent 4 }}
  securityContext:
    {{- toYaml $values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: weights, mountPath: {{ $values.weights.mountPath }}}
    - {name: tmp, mountPath: /tmp}
{{- end }}
{{- end }}

{{/* Egress rules shared by the server pods and the ingest Job. */}}
{{- define "gill.egressBase" -}}
{{- $np := .Values.networkPolicy }}
# DNS, to any resolver (kube-dns, NodeLocal DNSCache).
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- if .Values.milvus.uri }}
- ports:
    - {port: {{ $np.egress.milvusPort }}, protocol: TCP}
  {{- with $np.egress.milvus }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- if $np.egress.internet }}
# HTTP(S) to public addresses only: corpus image URLs and the model hub.
- to:
    - ipBlock:
        cidr: 0.0.0.0/0
        except: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 169.254.0.0/16, 100.64.0.0/10, 127.0.0.0/8]
  ports:
    - {port: 80, protocol: TCP}
    - {port: 443, protocol: TCP}
{{- end }}
{{- with $np.egress.extra }}
{{ toYaml . }}
{{- end }}
{{- end }}
